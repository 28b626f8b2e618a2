"""peftlab: parameter-efficient fine-tuning built from scratch, with PEFT's API and adapter files.

Replace ``import peft`` with ``import peftlab``: the names below behave as peft 0.21's do, and adapters
saved by either library load in the other.

Explained in: book/quickstart.ipynb
"""

from peftlab.auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                          AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM,
                          AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification)
from peftlab.config import PeftConfig, PeftType, TaskType
from peftlab.mapping import get_peft_model, inject_adapter_in_model
from peftlab.peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                                PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM,
                                PeftModelForSequenceClassification, PeftModelForTokenClassification)
from peftlab.tuners.adalora import AdaLoraConfig, AdaLoraModel
from peftlab.tuners.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from peftlab.tuners.boft import BOFTConfig, BOFTModel
from peftlab.tuners.ia3 import IA3Config, IA3Model
from peftlab.tuners.loha import LoHaConfig, LoHaModel
from peftlab.tuners.lokr import LoKrConfig, LoKrModel
from peftlab.tuners.lora import LoftQConfig, LoraConfig, LoraModel
from peftlab.tuners.oft import OFTConfig, OFTModel
from peftlab.tuners.xlora import XLoraConfig, XLoraModel
from peftlab.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict
from peftlab.utils.warning import PeftWarning

__version__ = "0.1.0"


def __getattr__(name: str):
    # peftlab.Trainer imports transformers.Trainer (and accelerate): only when asked for
    if name == "Trainer":
        from peftlab.trainer import Trainer

        return Trainer
    if name in ("PeftlabCallback", "AdaLoraCallback"):  # a transformers.TrainerCallback: only when asked for
        from peftlab.integrations.trainer import PeftlabCallback

        return PeftlabCallback  # AdaLoraCallback: the name AdaLoRA's warning gives
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")


__all__ = [
    "PeftConfig", "PeftType", "TaskType", "LoraConfig", "LoftQConfig", "LoraModel", "get_peft_model",
    "inject_adapter_in_model",
    "PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
    "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel", "OFTConfig", "OFTModel", "BOFTConfig", "BOFTModel",
    "IA3Config", "IA3Model", "AdaptionPromptConfig", "AdaptionPromptModel",
    "XLoraConfig", "XLoraModel", "AdaLoraConfig", "AdaLoraModel",
    "AdaLoraCallback", "PeftlabCallback",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "__version__", "Trainer", "PeftWarning",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
]
