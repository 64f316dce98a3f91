"""Tiny random models of the MoE families RoMA is tested on (built from transformers configs on CPU, no hub).

Each entry records what a test must find *independently of the registry* (router paths, scoring, bias), so the tests
can catch a registry that is wrong. Every config uses top_k = 2 (top_k = 1 with renormalisation has zero router
gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers as T

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
DEEPSEEK_MLA = dict(
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8
)


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    routers: list[str]  # every router weight owner (module path in the stock model), in layer order
    scoring: str  # "softmax" | "sigmoid" | "sqrtsoftplus": how the family turns logits into dense routing weights
    experts: int = 4
    bias: bool = False  # the router owns a trainable bias (GPT-OSS)
    num_layers: int = 2  # RomaConfig(num_layers=...)
    never_targeted: list[str] = field(default_factory=list)  # look-alike gates that must never be wrapped

    @property
    def tuned(self) -> list[str]:
        return self.routers[-self.num_layers :]


def _causal(config_cls: str, model_cls: str, **kwargs):
    kwargs = {**COMMON, **kwargs}

    def build():
        cfg = getattr(T, config_cls)(**kwargs)
        torch.manual_seed(0)
        return getattr(T, model_cls)(cfg).eval()

    return build


def _qwen3_vl_moe():
    cfg = T.Qwen3VLMoeConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=32,
            patch_size=4,
            temporal_patch_size=1,
            spatial_merge_size=1,
            deepstack_visual_indexes=[],
        ),
        image_token_id=90,
        video_token_id=91,
        vision_start_token_id=92,
        vision_end_token_id=93,
    )
    torch.manual_seed(0)
    return T.Qwen3VLMoeForConditionalGeneration(cfg).eval()


def _layers(template: str, indices) -> list[str]:
    return [template.format(i) for i in indices]


FAMILIES = {
    f.name: f
    for f in [
        Family(
            "olmoe",
            _causal(
                "OlmoeConfig",
                "OlmoeForCausalLM",
                intermediate_size=32,
                num_hidden_layers=3,
                num_experts=4,
                num_experts_per_tok=2,
                norm_topk_prob=True,
            ),
            _layers("model.layers.{}.mlp.gate", range(3)),
            "softmax",
        ),
        Family(
            "qwen2_moe",
            _causal(
                "Qwen2MoeConfig",
                "Qwen2MoeForCausalLM",
                intermediate_size=32,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=16,
                num_hidden_layers=3,
                num_experts=4,
                num_experts_per_tok=2,
            ),
            _layers("model.layers.{}.mlp.gate", range(3)),
            "softmax",
            never_targeted=_layers("model.layers.{}.mlp.shared_expert_gate", range(3)),
        ),
        Family(
            # decoder_sparse_step=2 makes layers 1, 3, 5, 7 sparse; mlp_only_layers=[5] makes 5 dense again. The last
            # 2 *MoE* layers are 3 and 7 (counting all layers would give 6 and 7).
            "qwen3_moe",
            _causal(
                "Qwen3MoeConfig",
                "Qwen3MoeForCausalLM",
                intermediate_size=32,
                moe_intermediate_size=16,
                num_hidden_layers=8,
                num_experts=4,
                num_experts_per_tok=2,
                head_dim=8,
                mlp_only_layers=[5],
                decoder_sparse_step=2,
            ),
            _layers("model.layers.{}.mlp.gate", [1, 3, 7]),
            "softmax",
            never_targeted=["model.layers.5.mlp.gate_proj"],
        ),
        Family(
            "mixtral",
            _causal(
                "MixtralConfig",
                "MixtralForCausalLM",
                intermediate_size=32,
                num_hidden_layers=3,
                num_local_experts=4,
                num_experts_per_tok=2,
            ),
            _layers("model.layers.{}.mlp.gate", range(3)),
            "softmax",
        ),
        Family(
            "deepseek_v2",
            _causal(
                "DeepseekV2Config",
                "DeepseekV2ForCausalLM",
                intermediate_size=32,
                moe_intermediate_size=16,
                num_hidden_layers=4,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=1,
                topk_group=1,
                **DEEPSEEK_MLA,
            ),
            _layers("model.layers.{}.mlp.gate", [1, 2, 3]),
            "softmax",
        ),
        Family(
            "deepseek_v3",
            _causal(
                "DeepseekV3Config",
                "DeepseekV3ForCausalLM",
                intermediate_size=32,
                moe_intermediate_size=16,
                num_hidden_layers=4,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=1,
                topk_group=1,
                norm_topk_prob=True,
                **DEEPSEEK_MLA,
            ),
            _layers("model.layers.{}.mlp.gate", [1, 2, 3]),
            "sigmoid",
        ),
        Family(
            "gpt_oss",
            _causal(
                "GptOssConfig",
                "GptOssForCausalLM",
                intermediate_size=32,
                num_hidden_layers=3,
                num_local_experts=4,
                num_experts_per_tok=2,
                head_dim=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            ),
            _layers("model.layers.{}.mlp.router", range(3)),
            "softmax",
            bias=True,
        ),
        Family(
            "granitemoe",
            _causal(
                "GraniteMoeConfig",
                "GraniteMoeForCausalLM",
                intermediate_size=32,
                num_hidden_layers=3,
                num_local_experts=4,
                num_experts_per_tok=2,
            ),
            _layers("model.layers.{}.block_sparse_moe.router", range(3)),
            "softmax",
        ),
        Family(
            "llama4_text",
            _causal(
                "Llama4TextConfig",
                "Llama4ForCausalLM",
                intermediate_size=32,
                intermediate_size_mlp=32,
                num_hidden_layers=6,
                num_local_experts=4,
                num_experts_per_tok=2,
                interleave_moe_layer_step=2,
                head_dim=8,
            ),
            _layers("model.layers.{}.feed_forward.router", [1, 3, 5]),
            "sigmoid",
        ),
        Family(
            "dbrx",
            _causal(
                "DbrxConfig",
                "DbrxForCausalLM",
                d_model=32,
                n_heads=4,
                n_layers=3,
                max_seq_len=64,
                attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
            ),
            _layers("transformer.blocks.{}.ffn.router.layer", range(3)),
            "softmax",
        ),
        Family(
            # The router reads its child's weight (F.linear(x, self.classifier.weight)) instead of calling the
            # child; the matrix has routed + zero (identity) expert rows: 4 + 2.
            "longcat_flash",
            _causal(
                "LongcatFlashConfig",
                "LongcatFlashForCausalLM",
                num_layers=3,
                n_routed_experts=4,
                zero_expert_num=2,
                num_experts_per_tok=2,
                expert_ffn_hidden_size=16,
                ffn_hidden_size=32,
                num_key_value_heads=4,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                head_dim=8,
            ),
            _layers("model.layers.{}.mlp.router.classifier", range(3)),
            "softmax",
            experts=6,
        ),
        Family(
            # The router scores with its own `score_fn`, built from config.scoring_func (default "sqrtsoftplus":
            # sqrt(softplus(logits))). Layer 0 is hash-routed (a static token -> expert table): not a router RoMA tunes.
            "deepseek_v4",
            _causal(
                "DeepseekV4Config",
                "DeepseekV4ForCausalLM",
                intermediate_size=32,
                moe_intermediate_size=16,
                num_hidden_layers=4,
                head_dim=8,
                max_position_embeddings=128,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                sliding_window=64,
                mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
            ),
            _layers("model.layers.{}.mlp.gate", [1, 2, 3]),
            "sqrtsoftplus",
        ),
        Family(
            # Also scores with its own `score_fn` (config.scoring_func, default "sigmoid").
            "inkling2",
            _causal(
                "Inkling2TextConfig",
                "Inkling2ForCausalLM",
                intermediate_size=32,
                moe_intermediate_size=16,
                num_hidden_layers=3,
                head_dim=8,
                max_position_embeddings=128,
                num_local_experts=4,
                num_experts_per_tok=2,
                sliding_window=64,
            ),
            _layers("model.layers.{}.mlp.gate", range(3)),
            "sigmoid",
        ),
        Family(
            "qwen3_vl_moe",
            _qwen3_vl_moe,
            _layers("model.language_model.layers.{}.mlp.gate", range(3)),
            "softmax",
        ),
    ]
}
