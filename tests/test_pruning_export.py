"""Exactness of export: the masked model under the final masks equals the exported compact model."""

import os

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, MistralConfig,
                          Qwen2Config)

from drpruning_composer.pruning.attach import attach_masks, bias_layout, check_supported
from drpruning_composer.pruning.export import export_pruned_model
from drpruning_composer.pruning.masks import L0Masks, target_gates
from drpruning_composer.pruning.structure import (MASK_TYPES, ModelShape, expected_non_embedding_params,
                                                  resolve_target)

os.environ.setdefault('HF_HUB_OFFLINE', '1')

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, max_position_embeddings=64)
CASES = {
    'llama_mha': (LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4),
                  dict(num_hidden_layers=2, hidden_size=40, num_attention_heads=2, intermediate_size=48)),
    'llama_gqa': (LlamaConfig(**COMMON, num_attention_heads=8, num_key_value_heads=4),
                  dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=40)),
    'mistral_gqa': (MistralConfig(**COMMON, num_attention_heads=8, num_key_value_heads=2, sliding_window=None),
                    dict(num_hidden_layers=2, hidden_size=56, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64)),
    'qwen2_bias': (Qwen2Config(**COMMON, num_attention_heads=8, num_key_value_heads=2),
                   dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=72)),
    'llama_tied_bias': (LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                    attention_bias=True, mlp_bias=True),
                        dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=2, intermediate_size=80)),
}


def _randomise(model: torch.nn.Module) -> None:
    """Weights large enough that a wrong index or norm statistic shows up far above the tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)


def _masked_model(config, target):
    torch.manual_seed(0)
    config._attn_implementation = 'eager'
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    _randomise(model)
    source = ModelShape.from_config(config)
    masks = L0Masks(source, resolve_target(source, target), MASK_TYPES, bias_layout(model), eval_mode='target')
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.copy_(3.0 * torch.randn_like(p))
    attach_masks(model, masks)
    return model.eval(), masks


@pytest.mark.parametrize('case', sorted(CASES))
def test_export_equals_masked_model_under_final_masks(case, tmp_path):
    config, target = CASES[case]
    model, masks = _masked_model(config, target)
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        masked_logits = model(tokens).logits
        unmasked = {k: v for k, v in model.state_dict().items()}

    out = export_pruned_model(unmasked, config.to_dict(), target, tmp_path / 'pruned')
    assert not [p.name for p in tmp_path.iterdir() if p.name != 'pruned'], 'temporary folder left behind'
    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, torch_dtype=torch.float32)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    pruned.eval()
    for key, value in target.items():
        assert getattr(pruned.config, key) == value
    with torch.no_grad():
        pruned_logits = pruned(tokens).logits
    assert (masked_logits - pruned_logits).abs().max().item() <= 1e-4

    # The parameter count formula is exact under binary masks.
    gates = target_gates(dict(masks.log_alpha.items()), masks.target)
    counted = sum(p.numel() for n, p in pruned.named_parameters() if 'embed_tokens' not in n and 'lm_head' not in n)
    assert expected_non_embedding_params(gates, masks.source, masks.bias).item() == counted

    generated = pruned.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)


def test_failed_export_leaves_no_folder(tmp_path):
    config, target = CASES['llama_mha']
    model, _ = _masked_model(config, target)
    state = dict(model.state_dict())
    state['model.layers.0.self_attn.rogue.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match='rogue'):
        export_pruned_model(state, config.to_dict(), target, tmp_path / 'pruned')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('target, field', [
    ({'hidden_size': 65}, 'hidden_size'),
    ({'num_hidden_layers': 5}, 'num_hidden_layers'),
    ({'num_attention_heads': 6, 'num_key_value_heads': 4}, 'num_attention_heads'),
    ({'num_attention_heads': 3}, 'num_attention_heads'),
    ({'intermediate_size': 0}, 'intermediate_size'),
    ({'vocab_size': 10}, 'vocab_size'),
])
def test_invalid_target_names_the_field(target, field):
    source = ModelShape.from_config(CASES['llama_gqa'][0])
    with pytest.raises(ValueError, match=field):
        resolve_target(source, target)


def test_unsupported_architecture_is_rejected():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match='unsupported architecture GPT2LMHeadModel'):
        check_supported(gpt2)


def test_export_without_source_generation_config_derives_it_as_hugging_face_does(tmp_path):
    """Issue 20, item 1: a source folder without generation_config.json gets the one `from_pretrained` would derive
    from its config; the export writes it, so the exported model generates as the source does."""
    from transformers import GenerationConfig

    from drpruning_composer.pruning.export import source_generation_config

    config, target = CASES['llama_gqa']
    config = LlamaConfig(**{**config.to_dict(), 'eos_token_id': 5, 'bos_token_id': 4})
    model, _ = _masked_model(config, target)
    model.save_pretrained(tmp_path / 'source')
    (tmp_path / 'source' / 'generation_config.json').unlink()
    source = AutoModelForCausalLM.from_pretrained(tmp_path / 'source')
    recorded = source_generation_config(tmp_path / 'source', config)
    out = export_pruned_model(dict(model.state_dict()), config.to_dict(), target, tmp_path / 'pruned',
                              generation_config=recorded)
    default = export_pruned_model(dict(model.state_dict()), config.to_dict(), target, tmp_path / 'default')
    for folder in (out, default):
        assert (folder / 'generation_config.json').is_file()
        exported = AutoModelForCausalLM.from_pretrained(folder).generation_config
        assert exported.to_diff_dict() == source.generation_config.to_diff_dict() == GenerationConfig.from_pretrained(
            folder).to_diff_dict()
        assert exported.eos_token_id == 5 and exported.bos_token_id == 4


@pytest.mark.parametrize('source_dtype, dtype, expected', [
    ('bfloat16', None, torch.bfloat16),  # the source's dtype unless told otherwise
    ('float16', None, torch.float16),
    ('bfloat16', torch.float32, torch.float32),
    (None, None, torch.float32),  # a config without torch_dtype: the weights' own
])
def test_export_is_written_in_the_source_dtype(tmp_path, source_dtype, dtype, expected):
    """Issue 20, item 2: a bfloat16 source exported as float32 doubled the size users expect."""
    import json

    from safetensors.torch import load_file

    config, target = CASES['llama_tied_bias']
    model, _ = _masked_model(config, target)
    source_config = {**config.to_dict(), 'torch_dtype': source_dtype}
    state = dict(model.state_dict())
    out = export_pruned_model(state, source_config, target, tmp_path / 'pruned', dtype=dtype)
    weights = load_file(out / 'model.safetensors')
    assert {v.dtype for v in weights.values()} == {expected}
    assert json.loads((out / 'config.json').read_text())['torch_dtype'] == str(expected).removeprefix('torch.')
    full = load_file(export_pruned_model(state, source_config, target, tmp_path / 'fp32', dtype=torch.float32)
                     / 'model.safetensors')
    assert all(torch.equal(weights[k], full[k].to(expected)) for k in full)  # the same model, cast
    loaded = AutoModelForCausalLM.from_pretrained(out, torch_dtype='auto')
    assert loaded.dtype == expected and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
