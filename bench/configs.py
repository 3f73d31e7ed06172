"""Real-size model configurations for bench/trainer_gpu.py, written out (nothing is downloaded).

The numbers are the published config.json values of each model's diffusers/transformers layout:
FLUX.1-dev (black-forest-labs), Stable Diffusion 3 medium (stabilityai), Kolors
(Kwai-Kolors/Kolors-diffusers) and Hunyuan-DiT v1.2 (Tencent-Hunyuan, diffusers layout). Only the
denoiser, the VAE and the text encoders are real size; tokenizers and schedulers come from the
tiny pipelines (lorakube_dev.tiny), which use the real scheduler configs and tokenize into ids every
real vocabulary holds. Weights are random.
"""

from __future__ import annotations

from typing import Any, Callable

# (pixels, pixels): the family's native training size.
NATIVE_SIZE = {"flux": 1024, "sd3": 1024, "kolors": 1024, "hunyuan-dit": 1024}
# Parameters of the denoiser as published, for the sanity check that the config is the real one.
PUBLISHED_PARAMS_B = {"flux": 11.9, "sd3": 2.0, "kolors": 2.6, "hunyuan-dit": 1.5}

DENOISERS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)),
    "kolors": ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
        encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=5632, use_linear_projection=True,
        norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)),
    "hunyuan-dit": ("HunyuanDiT2DModel", dict(
        num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
        activation_fn="gelu-approximate", sample_size=128, hidden_size=1408, num_layers=40, mlp_ratio=4.3637,
        learn_sigma=True, cross_attention_dim=1024, norm_type="layer_norm", cross_attention_dim_t5=2048,
        pooled_projection_dim=1024, text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False)),
}

_VAE_COMMON = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, sample_size=1024, force_upcast=True,
)
VAES: dict[str, dict[str, Any]] = {
    "flux": dict(_VAE_COMMON, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
    "sd3": dict(_VAE_COMMON, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False),
    "kolors": dict(_VAE_COMMON, latent_channels=4, scaling_factor=0.13025),     # SDXL's VAE
    "hunyuan-dit": dict(_VAE_COMMON, latent_channels=4, scaling_factor=0.13025),
}


# The tiny tokenizers' special ids (lorakube_dev.tiny) are kept: CLIP pools at its eos id.
def _clip_l(projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _clip_g() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=512, eos_token_id=513,
        pad_token_id=513))


def _t5(vocab: int, d_model: int, d_ff: int, heads: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=24,
                                   num_heads=heads, feed_forward_proj="gated-gelu",
                                   relative_attention_num_buckets=32, decoder_start_token_id=0))


def _chatglm3() -> Any:
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    cfg = ChatGLMConfig(num_layers=28, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                        kv_channels=128, num_attention_heads=32, seq_length=32768, multi_query_attention=True,
                        multi_query_group_num=2, add_qkv_bias=True, original_rope=True, rmsnorm=True,
                        post_layer_norm=True, add_bias_linear=False, layernorm_epsilon=1e-5)
    return ChatGLMModel(cfg, empty_init=False)


def _bert_chinese_clip() -> Any:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=47020, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096, max_position_embeddings=512))


# Pipeline component name -> builder, per family.
TEXT_ENCODERS: dict[str, dict[str, Callable[[], Any]]] = {
    "flux": {"text_encoder": lambda: _clip_l(False), "text_encoder_2": lambda: _t5(32128, 4096, 10240, 64)},
    "sd3": {"text_encoder": lambda: _clip_l(True), "text_encoder_2": _clip_g,
            "text_encoder_3": lambda: _t5(32128, 4096, 10240, 64)},
    "kolors": {"text_encoder": _chatglm3},
    "hunyuan-dit": {"text_encoder": _bert_chinese_clip, "text_encoder_2": lambda: _t5(250112, 2048, 5120, 32)},
}


def build_denoiser(family: str) -> Any:
    import diffusers

    class_name, kwargs = DENOISERS[family]
    return getattr(diffusers, class_name)(**kwargs)


def build_vae(family: str) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAES[family])
