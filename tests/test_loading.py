"""Model loading (``roma_peft.loading`` and the CLI's model flags): every option reaches ``from_pretrained``, bad ones
are refused in one line before a weight loads, quantized bases keep their routers unquantized."""

import json
import warnings

import pytest
import torch
import transformers
from families import FAMILIES
from helpers_cli import one_line_error, run_cli
from helpers_training import tiny_base_model, tiny_tokenizer, train_samples
from torch import nn

import roma_peft
from roma_peft import cli, loading
from roma_peft.layer import RomaLayer
from roma_peft.loading import RouterNotTrainableError, load_model_and_tokenizer

DBRX_ROUTERS = [f"transformer.blocks.{i}.ffn.router" for i in range(3)]  # each wraps an nn.Linear `layer`


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny saved OLMoE (router = a parameter, never quantized) and a tiny DBRX (router = nn.Linear child)."""
    root = tmp_path_factory.mktemp("loading")
    tiny_base_model(num_layers=3).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    FAMILIES["dbrx"].build().save_pretrained(root / "dbrx")
    tiny_tokenizer().save_pretrained(root / "dbrx")
    (root / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in train_samples(8)))
    return root


class Captured(Exception):
    """Raised by the fake ``from_pretrained`` once it has recorded its arguments."""


@pytest.fixture
def capture(monkeypatch):
    """Replace ``AutoModelForCausalLM.from_pretrained``: record (path, kwargs); by default load the real model without
    the quantization config (so the rest of the loader runs), or raise ``Captured`` with ``calls.stop = True``."""
    real = transformers.AutoModelForCausalLM.from_pretrained

    class Calls(list):
        stop = False
        transform = None

    calls = Calls()

    def fake(path, *args, **kwargs):
        calls.append((str(path), kwargs))
        if calls.stop:
            raise Captured()
        kept = {k: v for k, v in kwargs.items() if k in ("dtype", "device_map")}
        model = real(path, **kept)
        return calls.transform(model) if calls.transform else model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    return calls


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def with_bitsandbytes(monkeypatch):
    """Pretend bitsandbytes is installed (the loader only builds the config; ``capture`` loads unquantized)."""
    monkeypatch.setattr(loading, "_bitsandbytes_installed", lambda: True)


# ---------------------------------------------------------------- options reach from_pretrained
def test_python_helper_passes_every_option(workspace, capture):
    _, tok = load_model_and_tokenizer(
        str(workspace / "model"),
        dtype="bf16",
        device_map="cpu",
        attn_implementation="sdpa",
        revision="v1.0",
        trust_remote_code=True,
        model_kwargs={"low_cpu_mem_usage": True},
    )
    ((path, kwargs),) = capture
    assert path == str(workspace / "model")
    assert kwargs == {
        "dtype": torch.bfloat16,
        "device_map": "cpu",
        "attn_implementation": "sdpa",
        "revision": "v1.0",
        "trust_remote_code": True,
        "low_cpu_mem_usage": True,
    }
    assert tok.pad_token_id is not None


@pytest.mark.parametrize(
    "given, expected",
    [
        ("auto", "auto"),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_short_and_long_names(given, expected):
    assert loading.normalize_dtype(given) == expected


def test_cli_passes_every_option(capsys, workspace, capture):
    capture.stop = True
    with pytest.raises(Captured):  # the command got as far as loading, with these arguments
        cli.main(
            [
                "evaluate",
                "--model_name_or_path",
                str(workspace / "model"),
                "--eval_file",
                str(workspace / "train.jsonl"),
                "--dtype",
                "bf16",
                "--device_map",
                '{"": "cpu"}',
                "--attn_implementation",
                "eager",
                "--revision",
                "abc123",
                "--trust_remote_code",
                "true",
            ]
        )
    ((path, kwargs),) = capture
    assert path == str(workspace / "model")
    assert kwargs == {
        "dtype": torch.bfloat16,
        "device_map": {"": "cpu"},
        "attn_implementation": "eager",
        "revision": "abc123",
        "trust_remote_code": True,
    }


def test_cli_device_map_auto_and_defaults(workspace, capture):
    capture.stop = True
    with pytest.raises(Captured):
        cli._load_model(cli.ModelArguments(model_name_or_path=str(workspace / "model"), device_map="auto"))
    with pytest.raises(Captured):
        cli._load_model(cli.ModelArguments(model_name_or_path=str(workspace / "model")))
    assert capture[0][1] == {"dtype": "auto", "device_map": "auto", "trust_remote_code": False}
    assert capture[1][1] == {"dtype": "auto", "trust_remote_code": False}  # nothing else unless asked


def test_device_map_names_existing_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert loading.parse_device_map("cuda:1") == "cuda:1"
    assert loading.parse_device_map("cuda") == "cuda"
    assert loading.parse_device_map("1") == 1
    assert loading.parse_device_map('{"model": 0, "lm_head": "cuda:1", "model.norm": "disk"}') == {
        "model": 0,
        "lm_head": "cuda:1",
        "model.norm": "disk",
    }
    with pytest.raises(
        ValueError,
        match=r"--device_map 'cuda:3': there is no cuda device 3; this machine has 2 "
        r"\(cuda:0, cuda:1\)",
    ):
        loading.parse_device_map("cuda:3", prefix="--")
    with pytest.raises(ValueError, match="there is no cuda device 2"):
        loading.parse_device_map({"": 2})


# ---------------------------------------------------------------- one real load: bf16 on the CPU, float32 deltas
def test_real_load_bf16_cpu_and_float32_deltas(workspace):
    model, tok = load_model_and_tokenizer(str(workspace / "model"), dtype="bf16", device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    margs = cli.ModelArguments(model_name_or_path=str(workspace / "model"), dtype="bfloat16", device_map="cpu")
    peft_model, _ = cli._load_model(margs, cli.AdapterArguments(num_layers=2), trainable=True)
    layers = [m for m in peft_model.modules() if isinstance(m, RomaLayer)]
    assert len(layers) == 2
    for layer in layers:
        delta = layer.roma_delta["default"]
        assert delta.dtype == torch.float32 and delta.device.type == "cpu" and delta.requires_grad
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
    ids = tok(["Question: a b\nAnswer:"], return_tensors="pt").input_ids
    peft_model(ids, labels=ids).loss.backward()
    assert all(layer.roma_delta["default"].grad is not None for layer in layers)


# ---------------------------------------------------------------- refused before any weight loads
@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--dtype", "fp8"],
            (
                "--dtype 'fp8' is not supported; use one of auto, float32, bfloat16, float16 (or the short "
                "names fp32, bf16, fp16)"
            ),
        ),
        (["--device_map", "cuda:3"], "--device_map 'cuda:3': CUDA is not available on this machine"),
        (["--device_map", "cuda"], "--device_map 'cuda': CUDA is not available on this machine"),
        (["--device_map", "tpu:0"], "--device_map 'tpu:0' is not a device"),
        (["--device_map", '{"": "cuda:0"'], "--device_map is not valid JSON"),
        (["--device_map", '{"model": 0}'], "--device_map (module 'model') 0: CUDA is not available"),
        (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit exclude each other"),
        (["--load_in_4bit", "--bnb_4bit_quant_type", "int3"], "--bnb_4bit_quant_type 'int3' is not supported"),
        (["--attn_implementation", "fast"], "--attn_implementation 'fast' is not supported; use one of eager"),
        (["--attn_implementation", "flash_attention_2"], "flash attention runs on CUDA GPUs only"),
    ],
)
def test_bad_options_are_one_line_before_loading(capsys, workspace, no_weights, no_cuda, flags, message):
    status, err = run_cli(
        capsys,
        "evaluate",
        "--model_name_or_path",
        workspace / "model",
        "--eval_file",
        workspace / "train.jsonl",
        *flags,
    )
    assert status == 2
    assert message in one_line_error(err, "evaluate")


def test_missing_bitsandbytes_and_missing_model(capsys, workspace, no_weights, monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "_bitsandbytes_installed", lambda: False)
    status, err = run_cli(
        capsys,
        "evaluate",
        "--model_name_or_path",
        workspace / "model",
        "--eval_file",
        workspace / "train.jsonl",
        "--load_in_8bit",
    )
    assert status == 2 and "--load_in_8bit needs the bitsandbytes package" in one_line_error(err, "evaluate")
    missing = tmp_path / "checkpoints" / "olmoe"
    status, err = run_cli(
        capsys,
        "train",
        "--model_name_or_path",
        missing,
        "--train_file",
        workspace / "train.jsonl",
        "--output_dir",
        tmp_path / "out",
        "--regularizer",
        "none",
    )
    assert status == 2 and f"--model_name_or_path '{missing}': no such directory" in one_line_error(err, "train")
    with pytest.raises(FileNotFoundError, match="model_name_or_path .*: no such directory"):
        load_model_and_tokenizer(str(missing))


def test_merge_refuses_a_quantized_base(capsys, workspace, no_weights, with_bitsandbytes, tmp_path):
    from peft import get_peft_model

    get_peft_model(tiny_base_model(num_layers=3), roma_peft.RomaConfig(num_layers=2)).save_pretrained(tmp_path / "a")
    status, err = run_cli(
        capsys,
        "merge",
        "--model_name_or_path",
        workspace / "model",
        "--adapter_path",
        tmp_path / "a",
        "--output_dir",
        tmp_path / "merged",
        "--load_in_4bit",
    )
    assert status == 2 and "merge writes a full-precision checkpoint" in one_line_error(err, "merge")


# ---------------------------------------------------------------- quantization: routers stay unquantized
def test_router_names_found_on_the_meta_device(workspace):
    routers, defaults = loading.router_skip_modules(str(workspace / "dbrx"))
    assert routers == DBRX_ROUTERS and "lm_head" in defaults


def test_routers_go_into_llm_int8_skip_modules(workspace, capture, with_bitsandbytes):
    with pytest.warns(UserWarning, match=r"bitsandbytes quantizes nn.Linear layers only, \d+% of the parameters"):
        # DBRX's experts are fused 3-D parameters in transformers 5: bitsandbytes leaves them in dtype
        load_model_and_tokenizer(str(workspace / "dbrx"), load_in_8bit=True, llm_int8_skip_modules=["transformer.wte"])
    config = capture[-1][1]["quantization_config"]
    assert isinstance(config, transformers.BitsAndBytesConfig) and config.load_in_8bit and not config.load_in_4bit
    assert set(config.llm_int8_skip_modules) == {*DBRX_ROUTERS, "lm_head", "transformer.wte"}

    load_model_and_tokenizer(
        str(workspace / "dbrx"),
        dtype="bf16",
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
    )
    config = capture[-1][1]["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16  # defaults to --dtype
    assert set(config.llm_int8_skip_modules) == {*DBRX_ROUTERS, "lm_head"}

    # a ready BitsAndBytesConfig keeps its own skips and gets the routers added
    mine = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "transformer.wte"])
    load_model_and_tokenizer(str(workspace / "dbrx"), quantization_config=mine)
    assert set(capture[-1][1]["quantization_config"].llm_int8_skip_modules) == {
        *DBRX_ROUTERS,
        "lm_head",
        "transformer.wte",
    }


def test_cli_quantization_flags(workspace, capture, with_bitsandbytes):
    capture.stop = True
    with pytest.raises(Captured):
        cli.main(
            [
                "evaluate",
                "--model_name_or_path",
                str(workspace / "dbrx"),
                "--eval_file",
                str(workspace / "train.jsonl"),
                "--load_in_4bit",
                "--bnb_4bit_compute_dtype",
                "bf16",
                "--llm_int8_skip_modules",
                "transformer.wte",
                "--device_map",
                "cpu",
            ]
        )
    kwargs = capture[-1][1]
    config = kwargs["quantization_config"]
    assert kwargs["device_map"] == "cpu" and kwargs["dtype"] == "auto"
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert set(config.llm_int8_skip_modules) == {*DBRX_ROUTERS, "lm_head", "transformer.wte"}


class Linear4bit(nn.Linear):
    """Stands in for ``bitsandbytes.nn.Linear4bit`` (refused by its class name, like the real one)."""


def _quantize_routers(model):
    for block in model.transformer.blocks:
        old = block.ffn.router.layer
        block.ffn.router.layer = Linear4bit(old.in_features, old.out_features, bias=False)
    return model


def test_quantized_router_is_refused(capsys, workspace, capture, with_bitsandbytes):
    capture.transform = _quantize_routers  # as if the skip list had missed them
    with pytest.raises(RouterNotTrainableError) as info:
        load_model_and_tokenizer(str(workspace / "dbrx"), load_in_4bit=True)
    message = str(info.value)
    assert "3 router(s) were quantized: transformer.blocks.0.ffn.router (bitsandbytes Linear4bit)" in message
    assert f"llm_int8_skip_modules={json.dumps(DBRX_ROUTERS)}" in message
    status, err = run_cli(
        capsys,
        "evaluate",
        "--model_name_or_path",
        workspace / "dbrx",
        "--eval_file",
        workspace / "train.jsonl",
        "--load_in_4bit",
    )
    assert status == 2
    assert "--llm_int8_skip_modules transformer.blocks.0.ffn.router" in one_line_error(err, "evaluate")


def test_int8_router_weight_is_refused():
    model = FAMILIES["dbrx"].build()
    layer = model.transformer.blocks[1].ffn.router.layer
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(
        RouterNotTrainableError,
        match=r"1 router\(s\) were quantized: transformer.blocks.1.ffn.router "
        r"\(weight dtype torch.int8\)",
    ):
        loading.check_routers_unquantized(model)
    loading.check_routers_unquantized(FAMILIES["dbrx"].build())  # a float model passes


def test_offloaded_tuned_router_is_refused(workspace):
    from peft import get_peft_model

    model = tiny_base_model(num_layers=3)
    gate = model.model.layers[2].mlp.gate  # what accelerate leaves behind for a CPU/disk-offloaded layer
    gate.weight = nn.Parameter(torch.empty(gate.weight.shape, device="meta"), requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, roma_peft.RomaConfig(num_layers=2))
    with pytest.raises(RouterNotTrainableError, match=r"offloaded .* model.layers.2.mlp.gate"):
        loading.check_adapted_routers(peft_model)


def test_meta_discovery_falls_back_to_patterns(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.warns(UserWarning, match="could not build"):
        routers, patterns = loading.router_skip_modules(str(tmp_path))
    assert routers == [] and r".*\.router" in patterns and "lm_head" in patterns


# ---------------------------------------------------------------- real bitsandbytes, where it runs
def test_real_bitsandbytes_keeps_routers_in_full_precision(workspace):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: quantization tested with mocks only")
    try:
        model, _ = load_model_and_tokenizer(str(workspace / "dbrx"), load_in_8bit=True, device_map="cpu")
    except RouterNotTrainableError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bitsandbytes build without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {type(exc).__name__}: {exc}")
    blocks = model.transformer.blocks
    assert type(blocks[0].norm_attn_norm.attn.Wqkv) is bnb.nn.Linear8bitLt  # the frozen base is quantized
    assert all(type(b.ffn.router.layer) is nn.Linear for b in blocks)  # the routers are not
    assert type(model.lm_head) is nn.Linear
    from peft import get_peft_model

    peft_model = get_peft_model(model, roma_peft.RomaConfig(num_layers=2))
    loading.check_adapted_routers(peft_model)
    deltas = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(deltas) == 2 and all(d.dtype == torch.float32 for d in deltas)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    peft_model(ids, labels=ids).loss.backward()
    assert all(d.grad is not None and torch.isfinite(d.grad).all() for d in deltas)

    unskipped = transformers.AutoModelForCausalLM.from_pretrained(
        str(workspace / "dbrx"),
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True),
        device_map="cpu",
    )
    with pytest.raises(RouterNotTrainableError, match="bitsandbytes Linear4bit"):
        loading.check_routers_unquantized(unskipped)


def test_commands_that_only_run_the_model_default_to_the_gpu(monkeypatch):
    """neighbours / evaluate / diagnose must not score a 7B model on the CPU of a GPU machine by default."""
    import torch

    from roma_peft import cli, loading

    seen = {}

    def fake_load(name, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # stop before any weight would load

    monkeypatch.setattr(loading, "load_model_and_tokenizer", fake_load)
    margs = cli.ModelArguments(model_name_or_path="some/model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for trainable, expected in ((False, None), (True, None)):
        with pytest.raises(SystemExit):
            cli._load_model(margs, trainable=trainable)
        assert seen["device_map"] is expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        cli._load_model(margs)
    assert seen["device_map"] == "auto"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit):
        cli._load_model(margs)
    assert seen["device_map"] == "cuda:1"  # each rank its own GPU: ranks split the samples, not the model
    with pytest.raises(SystemExit):
        cli._load_model(margs, trainable=True)
    assert seen["device_map"] is None  # training: the Trainer places the model
    with pytest.raises(SystemExit):
        cli._load_model(cli.ModelArguments(model_name_or_path="some/model", device_map="cpu"))
    assert seen["device_map"] == "cpu"  # an explicit choice wins
