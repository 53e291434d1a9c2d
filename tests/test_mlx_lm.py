"""The ecosystem's models: every architecture of mlx-lm that can be built
small, trained a few steps with FusedSGD and with stock optim.SGD, eager and
under MLX's compile idiom, must give stock's losses, params and state bit
for bit (float32, CPU). LoRA, QLoRA and mlx-lm's own trainer are in
tests/test_mlx_lm_training.py."""

import importlib
import pkgutil
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm.models
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal

# Generic small arguments: each architecture's ModelArgs.from_dict keeps the
# names it knows. Sizes are tiny (hidden 32, 2 layers, vocabulary 64).
# Once, on the CPU: the bit-for-bit contract is float32 on the CPU.
pytestmark = pytest.mark.devices("cpu")


GENERIC = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=64,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    layer_norm_eps=1e-5,
    norm_eps=1e-5,
    layer_norm_epsilon=1e-5,
    norm_epsilon=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    rope_parameters={
        "rope_theta": 10000.0,
        "rope_type": "default",
        "llama_4_scaling_beta": 0.0,
        "original_max_position_embeddings": 128,
    },
    partial_rotary_factor=0.5,
    rotary_pct=0.5,
    rotary_emb_base=10000,
    rotary_dim=4,
    attention_bias=False,
    mlp_bias=False,
    use_bias=False,
    use_qkv_bias=False,
    tie_word_embeddings=True,
    hidden_act="silu",
    post_norm=False,
    qk_norm=False,
    use_qk_norm=False,
    sliding_window=16,
    sliding_window_pattern=2,
    layer_types=["sliding_attention", "full_attention"],
    # mixtures of experts
    num_experts=4,
    num_local_experts=4,
    moe_num_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    shared_intermediate_size=32,
    n_shared_experts=1,
    num_shared_experts=1,
    num_shared_expert=1,
    moe_topk=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    first_k_dense_replace=1,
    num_dense_layers=1,
    moe_layer_freq=1,
    is_moe_layer=[False, True],
    use_mixed_mlp_moe=True,
    use_expert_bias=False,
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    # multi-head latent attention
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    # GPT-2 style names
    n_ctx=128,
    n_embd=32,
    n_head=4,
    n_layer=2,
    n_positions=128,
    n_inner=64,
    n_kv_heads=2,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    hidden_dim=64,
    d_model=32,
    n_heads=4,
    n_layers=2,
    block_size=128,
    # muP-style multipliers
    logits_scaling=1.0,
    attention_multiplier=1.0,
    embedding_multiplier=1.0,
    residual_multiplier=1.0,
    dim_model_base=32,
    scale_depth=1.0,
    scale_emb=1.0,
    no_rope_layers=[1, 1],
    intermediate_size_mlp=64,
    num_attention_groups=2,
    # state-space and recurrent blocks
    state_size=8,
    conv_kernel=4,
    use_conv_bias=True,
    time_step_rank=4,
    n_groups=1,
    time_step_limit=(0.0, float("inf")),
    time_step_min=0.001,
    time_step_max=0.1,
    time_step_floor=1e-4,
    conv_bias=False,
    conv_L_cache=3,
    block_dim=32,
    block_multiple_of=16,
    block_ffn_dim_multiplier=1.0,
    block_auto_adjust_ff_dim=False,
    full_attn_idxs=[1],
    conv1d_width=4,
    logits_soft_cap=30.0,
    attention_window_size=16,
    a_low_rank_dim=8,
    v_low_rank_dim=8,
    gate_low_rank_dim=8,
    decay_low_rank_dim=8,
    dense_attention_every_n_layers=1,
    ff_intermediate_size=64,
    gegelu_limit=20.0,
    use_cla=False,
    cla_share_factor=1,
    sliding_window_layers=[0],
    conv_window=2,
    num_kv_reuse_layers=0,
    layer_group_size=2,
    group_norm_size=1,
    attention_chunk_size=16,
    interleave_moe_layer_step=1,
    # architectures with their own names for the sizes
    num_vocab=64,
    model_dim=32,
    kv_channels=8,
)

_YARN = {
    "type": "yarn",
    "factor": 1.0,
    "original_max_position_embeddings": 128,
    "mscale_all_dim": 0,
    "mscale": 1,
    "beta_fast": 32,
    "beta_slow": 1,
}
_LINEAR_ATTENTION = dict(
    full_attention_interval=2,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
)
_KDA = {
    "kda_layers": [1],
    "full_attn_layers": [2],
    "num_heads": 4,
    "head_dim": 8,
    "short_conv_kernel_size": 4,
}
_LONGCAT = dict(
    ffn_hidden_size=64,
    moe_topk=2,
    expert_ffn_hidden_size=32,
    zero_expert_num=1,
    mla_scale_q_lora=True,
    mla_scale_kv_lora=True,
)
_ROPE_BY_LAYER_TYPE = {
    t: {"rope_theta": 10000.0, "rope_type": "default"}
    for t in ("full_attention", "sliding_attention")
}
_GEMMA4 = dict(
    num_kv_shared_layers=0,
    vocab_size_per_layer_input=64,
    hidden_size_per_layer_input=8,
    global_head_dim=8,
)
# What architectures need beyond the generic arguments.
OVERRIDES = {
    "deepseek_v2": dict(rope_scaling=_YARN),
    "minicpm3": dict(rope_scaling=_YARN),
    "qwen3_5": _LINEAR_ATTENTION,
    "qwen3_5_moe": _LINEAR_ATTENTION,
    "qwen3_next": _LINEAR_ATTENTION,
    "step3p5": dict(moe_top_k=2, moe_num_experts=4),
    # one expert per token, and a global-attention layer at index 3
    "llama4": dict(num_experts_per_tok=1, num_hidden_layers=4, no_rope_layers=[1] * 4),
    "exaone4": dict(sliding_window_pattern="LG"),
    "hunyuan": dict(rope_scaling={"alpha": 1.0, "factor": 1.0, "type": "dynamic"}),
    "jamba": dict(
        attn_layer_offset=1,
        attn_layer_period=2,
        expert_layer_offset=1,
        expert_layer_period=2,
        mamba_d_conv=4,
        mamba_d_state=8,
        mamba_expand=2,
    ),
    "nemotron_h": dict(
        mamba_num_heads=4,
        mamba_head_dim=8,
        mamba_proj_bias=False,
        ssm_state_size=8,
        hybrid_override_pattern="M*",
    ),
    "kimi_linear": dict(linear_attn_config=_KDA, model_max_length=128),
    "kimi_k3": dict(
        hidden_act="situ", num_experts_per_token=2, linear_attn_config=_KDA
    ),
    "olmo_hybrid": dict(_LINEAR_ATTENTION, linear_allow_neg_eigval=False),
    "dbrx": dict(
        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
    ),
    "openelm": dict(
        num_transformer_layers=2,
        model_dim=32,
        ffn_dim_divisor=8,
        num_query_heads=[4, 4],
        num_kv_heads=[2, 2],
        ffn_multipliers=[2.0, 2.0],
    ),
    "glm_moe_dsa": dict(
        index_head_dim=8,
        index_n_heads=2,
        index_topk=4,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
    ),
    "longcat_flash": dict(
        _LONGCAT, attention_method="MLA", zero_expert_type="identity"
    ),
    "longcat_flash_ngram": _LONGCAT,
    "mimo_v2_flash": dict(
        hybrid_layer_pattern=[0, 1],
        moe_layer_freq=[0, 1],
        add_swa_attention_sink_bias=False,
        add_full_attention_sink_bias=False,
        sliding_window_size=16,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        layernorm_epsilon=1e-5,
        swa_rope_theta=10000.0,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=2,
        swa_head_dim=8,
        swa_v_head_dim=8,
    ),
    "gemma3n": dict(
        num_kv_shared_layers=0,
        vocab_size_per_layer_input=64,
        rope_local_base_freq=10000.0,
        final_logit_softcapping=30.0,
        activation_sparsity_pattern=[0.0, 0.0],
        hidden_size_per_layer_input=8,
        altup_num_inputs=2,
        altup_coef_clip=120.0,
        altup_correct_scale=True,
        altup_active_idx=0,
        laurel_rank=4,
    ),
    "gemma4": _GEMMA4,
    "gemma4_text": _GEMMA4,
    "mellum": dict(rope_parameters=_ROPE_BY_LAYER_TYPE),
    "spark2_5": dict(hidden_act="gelu", rope_parameters=_ROPE_BY_LAYER_TYPE),
    "baichuan_m1": dict(tie_word_embeddings=False),  # its Model reads lm_head
    "plamo": dict(n_shared_head=2),  # 4 query heads share 2 key-value heads
    "lille-130m": dict(n_embd=128),  # its MLP width rounds to 0 below this
    "nemotron-nas": dict(
        block_configs=[{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}}]
        * 2
    ),
    "minimax_m3_vl": dict(moe_layer_freq=[0, 1]),
    "granitemoehybrid": dict(
        layer_types=["mamba", "attention"],
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_proj_bias=False,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_n_groups=1,
        mamba_conv_bias=True,
    ),
}

# Modules of mlx_lm.models that are not built here, and why. Everything else
# that defines Model and ModelArgs is trained below.
NOT_BUILT = {
    "olmo": "needs the ai2-olmo package (imports hf_olmo)",
    "bitnet": "its layers run a Metal kernel (mx.fast.metal_kernel): no CPU path",
    "muse_spark": "its attention runs a Metal kernel (mx.fast.metal_kernel): no "
    "CPU path",
    "deepseek_v41": "its forward pass has no gradient (VJP of gather_axis with "
    "respect to indices), for stock SGD too",
    "recurrent_gemma": "its Model never calls nn.Module.__init__, so "
    "trainable_parameters() fails, for stock SGD too",
    "phi3small": "its blocksparse attention crashed the interpreter (segfault) "
    "when built small",
    "prism_hadamard_qwen35": "needs a Hadamard weight pack from a checkpoint",
}


# Trained eager only: their forward pass cannot be compiled (for stock SGD
# either).
NOT_COMPILED = {
    "dbrx": "its forward pass evaluates an array (mx.eval), which mx.compile refuses",
}

# Built and trained, but their gradients hold NaN on the CPU from the first
# step (with stock SGD and a learning rate of 0 too): compared as "NaN where
# stock has NaN, the same bits elsewhere", not required to stay finite.
NAN_GRADIENTS = {"rwkv7"}


def _architectures() -> list[str]:
    names = []
    for info in pkgutil.iter_modules(mlx_lm.models.__path__):
        if info.name in NOT_BUILT:
            continue
        module = importlib.import_module(f"mlx_lm.models.{info.name}")
        if hasattr(module, "Model") and hasattr(module, "ModelArgs"):
            names.append(info.name)
    return sorted(names)


ARCHITECTURES = _architectures()

# The optimizer settings cycle over the architectures, so that each is seen
# on several of them.
OPTIONS = [
    dict(momentum=0.9, weight_decay=1e-4),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.25, weight_decay=1e-3),
    dict(weight_decay=1e-4),
]


def build(name: str, seed: int = 0) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{name}")
    config = dict(GENERIC, model_type=name, **OVERRIDES.get(name, {}))
    config["text_config"] = dict(config)  # vision-language wrappers
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def _loss(model, tokens):
    logits = model(tokens[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")


def _train(model, optimizer, batches, compiled: bool):
    loss_and_grad = nn.value_and_grad(model, _loss)

    def step(tokens):
        loss, grads = loss_and_grad(model, tokens)
        optimizer.update(model, grads)
        return loss

    if compiled:
        state = [model.state, optimizer.state]
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    losses = []
    for tokens in batches:
        losses.append(step(tokens))
        mx.eval(losses[-1], model.parameters(), optimizer.state)
    return losses


def assert_same(a: mx.array, b: mx.array, what: str) -> None:
    """Stock's bits, NaN where stock has NaN (whatever the NaN's bits)."""
    nan = mx.isnan(b) if mx.issubdtype(b.dtype, mx.floating) else None
    if nan is not None and nan.any().item():
        assert mx.array_equal(mx.isnan(a), nan).item(), f"{what}: NaN elsewhere"
        a, b = mx.where(nan, 0, a), mx.where(nan, 0, b)
    assert_bitwise_equal(a, b, what)


def assert_same_training(a_model, a_opt, a_losses, b_model, b_opt, b_losses):
    for i, (x, y) in enumerate(zip(a_losses, b_losses, strict=True)):
        assert_same(x, y, f"loss of step {i}")
    want = dict(tree_flatten(b_model.parameters()))
    got = dict(tree_flatten(a_model.parameters()))
    assert got.keys() == want.keys()
    for k in want:
        assert_same(got[k], want[k], k)
    want_state = dict(tree_flatten(b_opt.state))
    got_state = dict(tree_flatten(a_opt.state))
    # FusedSGD keeps no momentum buffers at momentum 0; everything else of
    # stock's state is there.
    assert {k for k in want_state if not k.endswith(".v")} <= got_state.keys()
    for k, v in got_state.items():
        if k in want_state:
            assert_same(v, want_state[k], f"state {k}")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_gives_stock_bits(name, compiled):
    if compiled and name in NOT_COMPILED:
        pytest.skip(NOT_COMPILED[name])
    options = OPTIONS[ARCHITECTURES.index(name) % len(OPTIONS)]
    schedule = dict(compiled=mfs.step_decay(0.05, 0.5, 2), eager=0.05)
    lr = schedule["compiled" if compiled else "eager"]
    stock_lr = optim.step_decay(0.05, 0.5, 2) if compiled else 0.05
    batches = [
        mx.random.randint(0, GENERIC["vocab_size"], (2, 6), key=mx.random.key(i))
        for i in range(3)
    ]
    model = build(name)
    initial = tree_map(lambda x: x, model.parameters())
    fused = mfs.FusedSGD(lr, **options)
    fused_losses = _train(model, fused, batches, compiled)

    stock_model = build(name)
    stock_model.update(initial)
    stock = optim.SGD(stock_lr, **options)
    stock_losses = _train(stock_model, stock, batches, compiled)
    assert_same_training(model, fused, fused_losses, stock_model, stock, stock_losses)
    if name not in NAN_GRADIENTS:
        assert all(mx.isfinite(x).item() for x in stock_losses), stock_losses
    # The run changed something (a test that cannot fail would not).
    moved = [
        k
        for (k, a), (_, b) in zip(
            tree_flatten(model.parameters()), tree_flatten(initial)
        )
        if not mx.array_equal(a, b).item()
    ]
    assert moved, "no parameter changed"


def test_every_module_is_built_or_listed():
    """A module of mlx_lm.models defining a model is either trained above or
    listed in NOT_BUILT with its reason; nothing listed is missing."""
    names = {info.name for info in pkgutil.iter_modules(mlx_lm.models.__path__)}
    assert set(NOT_BUILT) <= names
    assert len(ARCHITECTURES) >= 119
    assert "llama" in ARCHITECTURES and "qwen3" in ARCHITECTURES
