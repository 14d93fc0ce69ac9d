"""Fine-tuning transfer (the paper's last evaluation protocol): a DINO backbone and a new linear head
trained end to end on labelled images with DeiT's recipe, then evaluated and exported.

- :mod:`~dino.finetune.config`: the typed settings and presets (``dino/configs/finetune/``);
- :mod:`~dino.finetune.model`: the classifier and the layer-wise learning-rate groups;
- :mod:`~dino.finetune.data`: timm's augmentation, the resumable loaders, seeded Mixup/CutMix;
- :mod:`~dino.finetune.trainer`: the step, the run (checkpoints, resume, stop requests, log);
- :mod:`~dino.finetune.evaluate`: top-1/top-5 and per-class accuracy;
- :mod:`~dino.finetune.export`: the fine-tuned classifier out to timm.
"""

from dino.finetune.config import FinetuneConfig, load_finetune_config
from dino.finetune.trainer import FinetuneStep, FinetuneTrainer, finetune

__all__ = ["FinetuneConfig", "FinetuneStep", "FinetuneTrainer", "finetune", "load_finetune_config"]
