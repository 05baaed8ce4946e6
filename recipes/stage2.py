"""Stage 2: start from the stage-1 adapter and train on a mix whose last phase anneals to high-quality data.

    python recipes/stage2.py recipes/configs/demo_paligemma_stage2.yaml --init_adapter runs/demo/stage1/adapter
    accelerate launch --config_file recipes/accelerate/multi_gpu_ddp.yaml \
        recipes/stage2.py recipes/configs/paligemma_3b_roco_medpix_stage2.yaml

``adapter_mode: continue`` trains the stage-1 adapter further; ``adapter_mode: merge`` merges it into
the base and adds a new adapter. ``--resume true`` resumes an interrupted run of this stage from its
last checkpoint (same data, optimizer and scheduler state).
"""

import sys

from medvlm.demo import ensure_demo_model
from medvlm.training.cli import main

if __name__ == "__main__":
    sys.exit(main("stage2", prepare_model=ensure_demo_model))
