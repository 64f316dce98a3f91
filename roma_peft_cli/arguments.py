"""The ``roma-peft`` options that belong to the command line (model loading, data files, output folders).

Each flag is defined once, here or in the library dataclass a command also parses (``RomaTrainingArguments``,
``NeighbourhoodConfig``, ``DiagnoseConfig``); :data:`COMMAND_ARGUMENTS` says which dataclasses make up each
command's parser, so ``roma-peft <command> --help`` lists exactly the flags that command reads.

Only the standard library is imported here: ``roma-peft --help`` must not pay for torch or PEFT. Library classes are
named as ``"module:Class"`` strings and imported when a command's parser is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ModelArguments",
    "TrainFileArguments",
    "EvalFileArguments",
    "RowArguments",
    "DataArguments",
    "TrainDataArguments",
    "EvalDataArguments",
    "AdapterArguments",
    "NeighboursArguments",
    "TrainCommandArguments",
    "EvalCommandArguments",
    "MergeArguments",
    "ExportLoraArguments",
    "DiagnoseArguments",
    "COMMAND_ARGUMENTS",
]

_TEMPLATE_HELP = "How a question becomes a prompt; {question} is replaced by the sample's question."
# The library's default template (roma_peft.data.DEFAULT_PROMPT_TEMPLATE), spelled out here because this package must not
# import roma_peft (that would cost --help its speed); tests/test_cli_entry.py pins the two together.
DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Base MoE model (hub name or local directory)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: the model's."})
    adapter_path: str | None = field(default=None, metadata={"help": "A saved RoMA adapter to load."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: 'auto' (the checkpoint's), 'bfloat16'/'bf16', 'float16'/'fp16' or "
            "'float32'/'fp32'. RoMA's router deltas are float32 whatever this is."
        },
    )
    device_map: str | None = field(
        default=None,
        metadata={
            "help": "Where the weights go: 'auto' (spread over every GPU, for models larger than one), 'cpu', "
            "'cuda', 'cuda:1', or a JSON dict {module: device}. Default: the GPU when there is one ('auto'; "
            "under torchrun each process's own GPU), else the CPU; `train` leaves placement to the "
            "Trainer."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "'eager', 'sdpa', 'flash_attention_2' ... (default: transformers' choice)."}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of a hub checkpoint (model, config and tokenizer)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote model code (e.g. DeepSeekMoE)."})
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "Quantize the frozen base to 4 bit with bitsandbytes (pip install bitsandbytes); the routers "
            "stay unquantized (put into llm_int8_skip_modules automatically)."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={"help": "Quantize the frozen base to 8 bit with bitsandbytes; routers stay unquantized."},
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None, metadata={"help": "Compute dtype of 4-bit layers (default: --dtype unless 'auto', else float32)."}
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type: 'nf4' or 'fp4'."})
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata={"help": "Also quantize the 4-bit quantization constants (saves ~0.4 bit/weight)."}
    )
    llm_int8_skip_modules: list[str] | None = field(
        default=None,
        metadata={"help": "More modules to keep unquantized (the routers and lm_head are kept automatically)."},
    )

    def loading_kwargs(self) -> dict:
        """The keyword arguments of ``roma_peft.loading.load_model_and_tokenizer`` (its errors name the flags)."""
        return dict(
            tokenizer_name_or_path=self.tokenizer_name_or_path,
            dtype=self.dtype,
            device_map=self.device_map,
            attn_implementation=self.attn_implementation,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            load_in_4bit=self.load_in_4bit,
            load_in_8bit=self.load_in_8bit,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            llm_int8_skip_modules=self.llm_int8_skip_modules,
            prefix="--",
        )


# -------------------------------------------------------------------- data: three pieces, combined per command
_FORMATS = "JSONL, JSON, CSV/TSV, parquet or arrow file, a folder of them, or a hub dataset name"


@dataclass
class TrainFileArguments:
    train_file: str | None = field(default=None, metadata={"help": f"Training samples: {_FORMATS}."})
    train_split: str | None = field(default=None, metadata={"help": "Split of a hub dataset (default train)."})


@dataclass
class EvalFileArguments:
    eval_file: str | None = field(default=None, metadata={"help": f"Evaluation samples: {_FORMATS}."})
    eval_split: str | None = field(default=None, metadata={"help": "Split of the hub eval dataset."})


@dataclass
class RowArguments:
    """How the rows of a data file become samples (every command that reads data)."""

    column_map: str | None = field(
        default=None,
        metadata={
            "help": "How rows become samples: a roma_peft.data.HUB_COLUMN_MAPS name (e.g. 'arc_easy'), or a JSON "
            'object {schema key: column}, e.g. \'{"question": "q", "options": ["A", "B"], '
            '"label": "gold"}\'.'
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of a hub dataset that is not in the registry."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N samples."})


@dataclass
class DataArguments(RowArguments, EvalFileArguments, TrainFileArguments):
    """Training and evaluation data (``train``)."""


@dataclass
class TrainDataArguments(RowArguments, TrainFileArguments):
    """Training data only (``neighbours``, ``diagnose``)."""


@dataclass
class EvalDataArguments(RowArguments, EvalFileArguments):
    """Evaluation data only (``evaluate``)."""


# -------------------------------------------------------------------- per command
@dataclass
class AdapterArguments:
    """The ``RomaConfig`` options (which routers are tuned); ignored when ``--adapter_path`` is given."""

    layer_selection: str = field(default="last", metadata={"help": "'last', 'first', 'middle', 'all', 'indices'."})
    num_layers: int = field(
        default=5,
        metadata={
            "help": "MoE layers tuned (paper: last 5; a model with fewer MoE layers gets all of them unless "
            "this is set)."
        },
    )
    moe_layer_indices: list[int] | None = field(default=None, metadata={"help": "Explicit MoE layer positions."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Restrict to these router names."})
    train_router_bias: bool = field(default=True, metadata={"help": "Also adapt a router bias where there is one."})

    def to_config(self):
        from roma_peft.config import RomaConfig

        return RomaConfig(
            layer_selection=self.layer_selection,
            num_layers=self.num_layers,
            moe_layer_indices=self.moe_layer_indices,
            target_modules=self.target_modules,
            train_router_bias=self.train_router_bias,
        )


@dataclass
class NeighboursArguments:
    output_dir: str = field(metadata={"help": "Where the neighbourhood (and the base model's scores) are saved."})
    prompt_template: str = field(default=DEFAULT_PROMPT_TEMPLATE, metadata={"help": _TEMPLATE_HELP})
    routing_position: str = field(default="last", metadata={"help": "As --routing_position of `roma-peft train`."})
    routing_num_tokens: int = field(default=1, metadata={"help": "As --routing_num_tokens of `roma-peft train`."})
    routing_representation: str = field(
        default="probs", metadata={"help": "As --routing_representation of `roma-peft train`."}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "As --max_length of `roma-peft train`: the targets are read from the same truncated prompts "
            "as training (recorded; `train` reads it back)."
        },
    )
    use_chat_template: bool = field(
        default=False,
        metadata={"help": "Wrap prompts in the tokenizer's chat template (recorded; `train` reads it back)."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "With --use_chat_template: a system turn."})
    batch_size: int = field(default=16, metadata={"help": "Batch size of scoring and routing capture."})
    shard_block_size: int = field(
        default=256,
        metadata={
            "help": "Samples per block of the S stage; with several processes (torchrun / accelerate launch) "
            "each rank takes whole blocks. The results depend on it, not on the number of processes."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a neighbourhood already saved in --output_dir (refused otherwise)."}
    )


@dataclass
class TrainCommandArguments:
    neighbourhood_dir: str | None = field(
        default=None,
        metadata={
            "help": "Output of `roma-peft neighbours` (needed by manifold/random/self; train reads its layers, "
            "prompt and routing options back)."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Train into an --output_dir that already holds an adapter or checkpoints (refused "
            "otherwise, unless --resume_from_checkpoint continues that run)."
        },
    )


@dataclass
class EvalCommandArguments:
    output_file: str | None = field(default=None, metadata={"help": "Write per-sample predictions (JSON)."})
    prompt_template: str = field(default=DEFAULT_PROMPT_TEMPLATE, metadata={"help": _TEMPLATE_HELP})
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template."})
    system_prompt: str | None = field(default=None, metadata={"help": "With --use_chat_template: a system turn."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward."})
    shard_block_size: int = field(
        default=256,
        metadata={
            "help": "Samples per block; with several processes each rank scores whole blocks (the scores "
            "depend on it, not on the number of processes)."
        },
    )


@dataclass
class MergeArguments:
    output_dir: str = field(metadata={"help": "Output directory (must be new or empty)."})
    overwrite: bool = field(default=False, metadata={"help": "Allow writing into a non-empty directory."})
    adapter_name: str = field(
        default="default",
        metadata={
            "help": "Which adapter of --adapter_path: a directory saved with several adapters holds 'default' at "
            "its top and each other adapter NAME in a NAME/ subfolder (PEFT's layout)."
        },
    )


@dataclass
class ExportLoraArguments(MergeArguments):
    """The same options as ``merge``: where to write, and which adapter."""


@dataclass
class DiagnoseArguments:
    """``roma-peft diagnose`` options besides ``roma_peft.diagnose.DiagnoseConfig`` (what is measured)."""

    output_dir: str = field(metadata={"help": "Where diagnose.json, report.md and the PNG figures are written."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a diagnosis already in --output_dir."})
    prompt_template: str = field(default=DEFAULT_PROMPT_TEMPLATE, metadata={"help": _TEMPLATE_HELP})
    max_length: int | None = field(default=None, metadata={"help": "As --max_length of `roma-peft train`."})
    use_chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template."})
    system_prompt: str | None = field(default=None, metadata={"help": "With --use_chat_template: a system turn."})


# The dataclasses of each command's parser, in the order the command receives them. A string names a library class
# ("module:Class"), imported only when that command's parser is built.
COMMAND_ARGUMENTS: dict[str, tuple] = {
    "neighbours": (
        ModelArguments,
        TrainDataArguments,
        AdapterArguments,
        "roma_peft.neighbours:NeighbourhoodConfig",
        NeighboursArguments,
    ),
    "train": (
        ModelArguments,
        DataArguments,
        AdapterArguments,
        TrainCommandArguments,
        "roma_peft.trainer:RomaTrainingArguments",
    ),
    "evaluate": (ModelArguments, EvalDataArguments, EvalCommandArguments),
    "merge": (ModelArguments, MergeArguments),
    "export-lora": (ModelArguments, ExportLoraArguments),
    "diagnose": (ModelArguments, TrainDataArguments, "roma_peft.diagnose:DiagnoseConfig", DiagnoseArguments),
}
