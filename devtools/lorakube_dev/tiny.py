"""Tiny, randomly initialised pipelines of every family, saved in the real on-disk layout.

Tests, demos and the e2e run train on these instead of real weights: nothing is downloaded, yet
the trainer loads them through exactly the code path real checkpoints take
(`<Pipeline>.from_pretrained(folder)` reading `model_index.json` and one subfolder per component).
Every component is a few hundred kB; all pipelines build and save in a few seconds on CPU.

Tokenizers are built here from small in-memory vocabularies (no hub, no shipped vocab files):
a character-level byte BPE for CLIP, a unigram vocabulary for T5/mT5, a WordPiece vocabulary for
BERT, a sentencepiece model trained on the spot for ChatGLM, a byte-level BPE with a chat
template for Qwen3, one whose merges cover Qwen-Image's prompt template and one with Mistral's
control tokens in a Pixtral processor folder for Mistral 3. They tokenize real
text into real ids (not all-UNK), so prompts produce prompt-dependent embeddings.

    python -m lorakube_dev.tiny --family all --out ./tiny-models
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

# Words the tokenizers know as whole pieces; everything else falls back to characters.
_WORDS = (
    "a an the of in on at with and or to from by for is are photo picture painting drawing image "
    "red green blue yellow orange purple pink black white grey gray brown gold silver dark light "
    "circle square triangle star stripe stripes dot dots line lines shape shapes pattern grid "
    "cat dog bird fish tree flower house car boat mountain river sky sun moon cloud sea city "
    "small big large tiny bright soft sharp round flat old new style color colour background "
    "top bottom left right center middle corner two three many one lorakube"
).split()
_SENTENCES = tuple(
    f"a {c} {s} on a {b} background"
    for c in ("red", "green", "blue", "yellow", "purple", "white", "black", "orange")
    for s in ("circle", "square", "triangle", "star", "stripe pattern", "grid of dots")
    for b in ("dark", "light", "grey", "white", "blue")
)
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-()/ "
# qwen-image: the pipeline tokenizes up to 1024 prompt tokens after the 34 of its template.
TOKENIZER_MAX_LENGTH = {"clip": 77, "t5": 512, "bert": 77, "chatglm": 256, "qwen": 512, "qwen-image": 1024 + 34,
                        "mistral": 512}

# The VAEs keep the real spatial factor (8: four blocks, three downsamplings) so 64 px -> 8x8 latents.
_VAE_BLOCKS = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
)


# --- tokenizers -------------------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_clip_tokenizer() -> Any:
    """Character-level byte BPE with CLIP's special tokens: every byte (and byte + `</w>`) is a token."""
    from transformers import CLIPTokenizer

    units = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(units)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(units)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENIZER_MAX_LENGTH["clip"])


def build_t5_tokenizer() -> Any:
    """Unigram vocabulary in T5's id order (<pad>, </s>, <unk>), whole words first, then characters."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -5.0) for w in _WORDS]
    pieces += [(c, -10.0) for c in _CHARS if c != " "]
    pieces += [("▁" + c, -9.0) for c in _CHARS if c != " "]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TOKENIZER_MAX_LENGTH["t5"])


# A chat template with the two things Flux2KleinPipeline relies on: the im_start/im_end turns and
# `enable_thinking=False` closing an empty think block after the assistant header.
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_qwen_tokenizer() -> Any:
    """Byte-level BPE without merges (every byte is a token, as in Qwen's byte fallback) with Qwen's
    special tokens and a chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=TOKENIZER_MAX_LENGTH["qwen"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


# QwenImagePipeline's prompt template up to the user's text. The pipeline drops the first 34 token
# positions of the encoded prompt, which is where Qwen2.5's tokenizer ends this prefix.
QWEN_IMAGE_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)


def build_qwen_image_tokenizer() -> Any:
    """The byte-level Qwen tokenizer plus merges that make each word of the template's system prompt
    one token, so the prefix is 34 tokens as with the real vocabulary and drop_idx cuts exactly
    before the user's text. Other text still falls back to bytes (with the few merges these add)."""
    import re

    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    merges: list[tuple[str, str]] = []
    # Words after a newline carry no leading space ("system", "user", "Describe"); byte-level BPE
    # writes the space before every other word as "Ġ".
    words = re.findall(r"(?:^|(?<=\n)| )[A-Za-z]+", QWEN_IMAGE_TEMPLATE_PREFIX.replace("<|im_start|>", "\n"))
    for word in dict.fromkeys(w.replace(" ", "Ġ") for w in words):
        piece = word[0]
        for char in word[1:]:
            if piece + char not in vocab:
                vocab[piece + char] = len(vocab)
                merges.append((piece, char))
            piece += char
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH["qwen-image"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


# Mistral's control tokens, ids in the order of its tokenizer (0 <unk>, 1 <s>, 2 </s>, then the instruction,
# system-prompt and image tokens a PixtralProcessor looks up), and a chat template in Mistral's format that
# accepts Flux2Pipeline's messages (a system turn and a user turn, content as a list of text parts).
_MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>")
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.content is string %}{% set text = m.content %}"
    "{% else %}{% set text = m.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{% if m.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m.role == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def build_mistral_tokenizer() -> Any:
    """Byte-level BPE without merges (every byte a token, as Mistral's tekken falls back to) after
    Mistral's control tokens, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_MISTRAL_SPECIAL)}
    vocab.update({c: len(_MISTRAL_SPECIAL) + i for i, c in enumerate(_bytes_to_unicode())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=list(_MISTRAL_SPECIAL[3:10]), model_max_length=TOKENIZER_MAX_LENGTH["mistral"],
    )
    tok.chat_template = _MISTRAL_CHAT_TEMPLATE
    return tok


def write_pixtral_processor(folder: Path, patch_size: int, spatial_merge_size: int) -> None:
    """Turn a saved tokenizer folder into a PixtralProcessor folder, as FLUX.2 dev ships `tokenizer/`:
    the processor's and its image processor's configs next to the tokenizer files. Written as files
    because transformers builds a PixtralProcessor object only with torchvision installed."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    PixtralImageProcessorPil(patch_size={"height": patch_size, "width": patch_size}).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": patch_size, "spatial_merge_size": spatial_merge_size,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
    }, indent=2) + "\n")
    index_file = folder.parent / "model_index.json"
    index = json.loads(index_file.read_text())
    index[folder.name] = ["transformers", "PixtralProcessor"]
    index_file.write_text(json.dumps(index, indent=2) + "\n")


def build_bert_tokenizer() -> Any:
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(_WORDS)
    tokens += [c for c in _CHARS if c != " "] + ["##" + c for c in _CHARS if c != " "]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    # BertTokenizer(vocab_file=...) is silently ignored in transformers v5; pass the dict.
    return BertTokenizer(vocab=vocab, model_max_length=TOKENIZER_MAX_LENGTH["bert"])


def build_chatglm_tokenizer_model(out_file: Path) -> None:
    """Train a small sentencepiece model (what ChatGLMTokenizer reads as `tokenizer.model`)."""
    import sentencepiece

    buf = io.BytesIO()
    corpus = list(_SENTENCES) + [" ".join(_WORDS), _CHARS]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 4),
        model_writer=buf,
        vocab_size=400,
        model_type="unigram",
        byte_fallback=True,          # unseen characters become byte tokens, never <unk>
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_file.write_bytes(buf.getvalue())


def _chatglm_tokenizer(folder: Path) -> Any:
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    build_chatglm_tokenizer_model(folder / "tokenizer.model")
    return ChatGLMTokenizer(vocab_file=str(folder / "tokenizer.model"))


# --- text encoders ----------------------------------------------------------------------------

def _clip_text(with_projection: bool, hidden: int = 32, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENIZER_MAX_LENGTH["clip"],
        projection_dim=projection_dim, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def _t5_encoder(vocab_size: int, d_model: int = 32) -> Any:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
        num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def _qwen3_encoder(vocab_size: int, hidden: int = 16, layers: int = 27) -> Any:
    """Qwen3 causal LM deep enough for the hidden states FLUX.2 klein stacks (layers 9, 18, 27)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=TOKENIZER_MAX_LENGTH["qwen"], tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg)


def _mistral3_encoder(tokenizer: Any, hidden: int = 16, layers: int = 30) -> Any:
    """Mistral 3 (a Mistral language model with a Pixtral vision tower) deep enough for the hidden
    states FLUX.2 dev stacks (layers 10, 20, 30); the vision tower is one layer (prompts have no images)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=TOKENIZER_MAX_LENGTH["mistral"], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, patch_size=14, image_size=56)
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    ))


def _chatglm_encoder(vocab_size: int, hidden: int = 32) -> Any:
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel, RMSNorm

    cfg = ChatGLMConfig(
        num_layers=2, padded_vocab_size=vocab_size, hidden_size=hidden, ffn_hidden_size=2 * hidden,
        kv_channels=8, num_attention_heads=4, seq_length=TOKENIZER_MAX_LENGTH["chatglm"],
        multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
        original_rope=True,          # the real config.json has it; the class default lacks it
    )
    # empty_init=False: the default leaves Linear weights uninitialised; RMSNorm weights come
    # from torch.empty and _init_weights skips them (garbage up to 1e30 -> NaN embeddings).
    model = ChatGLMModel(cfg, empty_init=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    return model


# --- pipelines --------------------------------------------------------------------------------

def _vae(latent_channels: int, scaling: float, shift: float | None, quant: bool) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, scaling_factor=scaling,
        shift_factor=shift, use_quant_conv=quant, use_post_quant_conv=quant, **_VAE_BLOCKS,
    )


def _flux() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    t5_tok = build_t5_tokenizer()
    return FluxPipeline(
        # FLUX.1-dev's scheduler config: resolution-dependent ("dynamic") shift.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        ),
        vae=_vae(16, 0.3611, 0.1159, quant=False),
        text_encoder=_clip_text(with_projection=False),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 4, 8),
        ),
    )


def _sd3() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5_tok = build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(16, 1.5305, 0.0609, quant=False),
        text_encoder=_clip_text(with_projection=True),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_clip_text(with_projection=True),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=_t5_encoder(len(t5_tok), d_model=64),
        tokenizer_3=t5_tok,
        # Shaped like SD3.5 medium (MMDiT-X): block 0 has the second, image-only attention (attn2) and
        # q/k get RMS norms (SD3.5 large has the norms without attn2; SD3 medium neither), so the one
        # tiny model runs every layer kind the `sd3` family trains.
        transformer=SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
            dual_attention_layers=(0,), qk_norm="rms_norm",
        ),
    )


def _kolors(workdir: Path) -> Any:
    from diffusers import EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel

    tokenizer = _chatglm_tokenizer(workdir)
    hidden = 32
    return KolorsPipeline(
        vae=_vae(4, 0.13025, None, quant=True),
        text_encoder=_chatglm_encoder(len(tokenizer) + 16, hidden),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), cross_attention_dim=16, transformer_layers_per_block=1,
            encoder_hid_dim=hidden, encoder_hid_dim_type="text_proj",
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=hidden + 6 * 8,
        ),
        # Kolors' real scheduler config: 1100 training steps, beta_end 0.014.
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
            timestep_spacing="leading", steps_offset=1,
        ),
        force_zeros_for_empty_prompt=False,
    )


def _hunyuan_dit() -> Any:
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    bert_tok, t5_tok = build_bert_tokenizer(), build_t5_tokenizer()
    bert = BertModel(BertConfig(
        vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=TOKENIZER_MAX_LENGTH["bert"],
    ))
    return HunyuanDiTPipeline(
        vae=_vae(4, 0.13025, None, quant=True),
        text_encoder=bert,
        tokenizer=bert_tok,
        transformer=HunyuanDiT2DModel(
            num_attention_heads=3, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
            hidden_size=24, num_layers=2, cross_attention_dim=32, cross_attention_dim_t5=32,
            pooled_projection_dim=16, text_len=TOKENIZER_MAX_LENGTH["bert"], text_len_t5=256,
        ),
        # Hunyuan-DiT's real scheduler config: v-prediction, scaled_linear up to 0.03.
        scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear",
            prediction_type="v_prediction", clip_sample=False, steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=_t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
    )


_FLUX2_LATENT_CHANNELS, _FLUX2_TEXT_HIDDEN = 8, 16


def _flux2_vae_and_scheduler() -> tuple[Any, Any]:
    """What FLUX.2 klein and dev share besides the transformer class: the VAE and the scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    vae = AutoencoderKLFlux2(latent_channels=_FLUX2_LATENT_CHANNELS, **_VAE_BLOCKS)
    with torch.no_grad():   # non-trivial batch-norm statistics, so the latent normalisation is exercised
        vae.bn.running_mean.normal_(std=0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    # FLUX.2's scheduler config (klein's and dev's are the same); the pipelines compute their own μ
    # ("empirical").
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    return vae, scheduler


def _flux2_transformer(guidance_embeds: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * _FLUX2_LATENT_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * _FLUX2_TEXT_HIDDEN,
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    )


def _flux2_klein() -> Any:
    from diffusers import Flux2KleinPipeline

    tok = build_qwen_tokenizer()
    vae, scheduler = _flux2_vae_and_scheduler()
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=_qwen3_encoder(len(tok), _FLUX2_TEXT_HIDDEN), tokenizer=tok,
        transformer=_flux2_transformer(guidance_embeds=False), is_distilled=False,
    )


def _flux2_dev() -> Any:
    """Klein's tiny transformer and VAE with a guidance embedding, and Mistral 3 as the text encoder."""
    from diffusers import Flux2Pipeline

    tok = build_mistral_tokenizer()
    vae, scheduler = _flux2_vae_and_scheduler()
    return Flux2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=_mistral3_encoder(tok, _FLUX2_TEXT_HIDDEN), tokenizer=tok,
        transformer=_flux2_transformer(guidance_embeds=True),
    )


def _z_image() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_qwen_tokenizer()
    hidden = 32
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=TOKENIZER_MAX_LENGTH["qwen"],
        pad_token_id=tokenizer.pad_token_id,
    ))
    return ZImagePipeline(
        # Z-Image-Turbo's scheduler config: static shift 3 (the pipeline passes a resolution mu,
        # which the scheduler applies only with use_dynamic_shifting).
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=_vae(16, 0.3611, 0.1159, quant=False),     # the FLUX.1 VAE, as Z-Image ships it
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=hidden, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64],
        ),
    )


def _qwen_image() -> Any:
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen_image_tokenizer()
    hidden = 32
    # Qwen2.5-VL as the pipeline loads it (the vision tower is part of the checkpoint but unused for
    # text); head_dim 16 -> 8 rotary frequencies split over M-RoPE's time/height/width sections.
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=TOKENIZER_MAX_LENGTH["qwen-image"],
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        tie_word_embeddings=True,
    ))
    return QwenImagePipeline(
        # Qwen-Image's scheduler config: resolution-dependent shift up to 8192 tokens, grid stretched
        # to end at σ = 0.02.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
        ),
        # Three spatial downsamplings (8x, as the real VAE) and the real 16 latent channels, so the
        # config's default per-channel latents_mean/latents_std apply.
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                   temperal_downsample=[False, True, True]),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=hidden, axes_dims_rope=(4, 6, 6),
        ),
    )


def _builders(workdir: Path) -> dict[str, Callable[[], Any]]:
    return {"flux": _flux, "sd3": _sd3, "kolors": lambda: _kolors(workdir), "hunyuan-dit": _hunyuan_dit,
            "flux2-klein": _flux2_klein,
            "z-image": _z_image, "qwen-image": _qwen_image,
            "flux2-dev": _flux2_dev}


def build_tiny_pipeline(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the family's tiny pipeline with fixed random weights and `save_pretrained` it into
    `out_dir` (created). Returns `out_dir`, ready for `<Pipeline>.from_pretrained(out_dir)`."""
    from lorakube_api.contract import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The caller's RNG stream must not depend on whether a tiny model was built first.
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as work:
        torch.manual_seed(seed)
        pipe = _builders(Path(work))[family]()
        pipe.save_pretrained(out_dir, safe_serialization=True)
    if family == "flux2-dev":   # the tokenizer folder as FLUX.2 dev ships it: a Pixtral processor
        write_pixtral_processor(out_dir / "tokenizer", patch_size=14, spatial_merge_size=2)
    _write_marker(out_dir, family, seed)
    return out_dir


def _write_marker(out_dir: Path, family: str, seed: int) -> None:
    """A note next to model_index.json saying these are random weights (a human opening the folder
    must not mistake it for a real checkpoint)."""
    (out_dir / "TINY_RANDOM_MODEL.json").write_text(
        json.dumps({"family": family, "seed": seed, "note": "random weights for tests, not a real model"},
                   indent=2) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    from lorakube_api.contract import FAMILIES

    parser = argparse.ArgumentParser(prog="python -m lorakube_dev.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--family", required=True, choices=[*FAMILIES, "all"])
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder; with --family all, one subfolder per family")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    families = FAMILIES if args.family == "all" else (args.family,)
    for family in families:
        target = args.out / family if args.family == "all" else args.out
        build_tiny_pipeline(family, target, seed=args.seed)
        print(f"{family}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
