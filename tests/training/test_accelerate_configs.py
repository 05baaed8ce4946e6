"""The accelerate configs in recipes/accelerate/ read by accelerate's own launcher into the intended
plugin settings (offline: no GPU, no DeepSpeed needed; what runs on CPU is in test_fsdp_cpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def launch(name: str, monkeypatch) -> tuple[object, dict[str, str]]:
    """``accelerate launch --config_file NAME``'s arguments and the environment it hands each process
    (FSDP_* / ACCELERATE_*), set in this process so that accelerate's plugins read it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    env = {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return defaults, env


@pytest.mark.parametrize("name, kind", [("single_gpu.yaml", "NO"), ("multi_gpu_ddp.yaml", "MULTI_GPU"),
                                        ("cpu_2proc.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"),
                                        ("fsdp_sharded_27b.yaml", "FSDP"), ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_every_config_parses(name, kind, monkeypatch):
    defaults, _ = launch(name, monkeypatch)
    assert str(defaults.distributed_type).endswith(kind)
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(
        ["single_gpu.yaml", "multi_gpu_ddp.yaml", "cpu_2proc.yaml", "fsdp.yaml", "fsdp_sharded_27b.yaml",
         "deepspeed_zero2.yaml"]), "a new config needs a row here"


def test_sharded_27b_config_reads_into_the_intended_fsdp_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    defaults, env = launch("fsdp_sharded_27b.yaml", monkeypatch)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True             # full shard
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["Gemma3DecoderLayer", "SiglipEncoderLayer"]
    assert plugin.cpu_ram_efficient_loading is True and env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")
    assert plugin.activation_checkpointing is True and env["FSDP_OFFLOAD_PARAMS"] == "false"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and defaults.num_processes == 8


def test_27b_wrap_classes_are_the_blocks_of_a_gemma3_model(monkeypatch):
    """accelerate's FSDP2 wrap policy, fed this config, makes one unit of every Gemma 3 decoder block
    and every SigLIP encoder block of a (small, meta-device) Gemma3ForConditionalGeneration, nothing else."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    launch("fsdp_sharded_27b.yaml", monkeypatch)
    config = Gemma3Config(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=300),
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8),
                          mm_tokens_per_image=4)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
    units = [name for name, module in model.named_modules() if policy(module)]
    assert units == [f"model.vision_tower.encoder.layers.{i}" for i in range(2)] + [
        f"model.language_model.layers.{i}" for i in range(3)]


def test_zero2_config_reads_into_the_intended_deepspeed_plugin(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    launch("deepspeed_zero2.yaml", monkeypatch)
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 2 and zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
