"""Stage 1: train a LoRA adapter on the basic curriculum (modality, organ, presence).

    python recipes/stage1.py recipes/configs/demo_paligemma_stage1.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu_ddp.yaml \
        recipes/stage1.py recipes/configs/paligemma_3b_slake_stage1.yaml

Any config key can be overridden on the command line: ``--max_steps 20 --output_dir runs/try``.
"""

import sys

from medvlm.demo import ensure_demo_model
from medvlm.training.cli import main

if __name__ == "__main__":
    sys.exit(main("stage1", prepare_model=ensure_demo_model))
