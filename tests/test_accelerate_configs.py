"""Every shipped accelerate config parses with accelerate's own loader, and ``accelerate launch``'s
own argument handling turns it into the launch it describes (processes, machines, DeepSpeed stage and
offload, precision, TorchDynamo), without starting anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "accelerate_configs").glob("*.yaml"))
SHIPPED = {"single_gpu", "ddp_8gpu", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "cpu_2proc",
           "h200_8gpu_standard", "h200_8gpu_fast", "h200_8gpu_quality", "multinode_deepspeed", "fsdp2_8gpu"}


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= SHIPPED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_with_accelerate(path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.num_processes >= 1
    if "deepspeed" in path.stem:
        assert config.distributed_type.value == "DEEPSPEED"
        assert config.deepspeed_config["zero_stage"] in (2, 3)
    assert path.read_text().startswith("#"), "a comment first: what the file is for and how to launch with it"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_environment(path: Path, *extra: str) -> tuple[object, dict[str, str]]:
    """What ``accelerate launch --config_file PATH EXTRA -m hf_streamlm.run`` would hand to torchrun /
    the DeepSpeed launcher: the resolved arguments and the environment of the training processes."""
    if "--main_process_port" not in extra:  # accelerate refuses a port in use (29500 may be taken by a test run)
        extra = (*extra, "--main_process_port", str(free_port()))
    args = launch_command_parser().parse_args(["--config_file", str(path), *extra, "-m", "hf_streamlm.run",
                                               "recipe=quickstart"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        env = {}
    return args, env


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_launch_accepts_config(path):
    args, env = launch_environment(path)
    config = load_config_from_file(str(path))
    if config.num_processes > 1:
        assert int(args.nproc_per_node) * int(getattr(args, "nnodes", 1) or 1) == config.num_processes


def test_h200_variants_differ_in_precision_and_compilation():
    configs = {p.stem: p for p in CONFIGS}
    envs = {name: launch_environment(configs[f"h200_8gpu_{name}"])[1] for name in ("standard", "fast", "quality")}
    assert {k: e["ACCELERATE_MIXED_PRECISION"] for k, e in envs.items()} == {
        "standard": "bf16", "fast": "bf16", "quality": "no"}
    assert {k: e["ACCELERATE_DYNAMO_BACKEND"] for k, e in envs.items()} == {
        "standard": "NO", "fast": "INDUCTOR", "quality": "NO"}


def test_zero3_offload_puts_optimizer_and_parameters_on_cpu():
    args, env = launch_environment(next(p for p in CONFIGS if p.stem == "deepspeed_zero3_offload"))
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "cpu"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "cpu"


def test_multinode_config_takes_machine_rank_and_address_from_the_command_line():
    path = next(p for p in CONFIGS if p.stem == "multinode_deepspeed")
    args, _ = launch_environment(path)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 0)
    assert args.deepspeed_multinode_launcher == "standard" and args.deepspeed_hostfile
    args, _ = launch_environment(path, "--machine_rank", "1", "--main_process_ip", "192.168.1.7",
                                 "--main_process_port", "29600")
    assert args.node_rank == 1 and args.rdzv_endpoint == "192.168.1.7:29600"


def test_fsdp2_config_launches_fully_shard_per_layer_with_sharded_checkpoints():
    args, env = launch_environment(next(p for p in CONFIGS if p.stem == "fsdp2_8gpu"))
    assert int(args.nproc_per_node) == 8
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    # The layout hf_streamlm.train.fsdp reads the export from.
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
