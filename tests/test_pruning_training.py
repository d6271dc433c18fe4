"""L0MaskAlgorithm inside a Composer Trainer: bitwise resume, the Lagrangian reaching the target, logging, export."""

import io
import os

import pytest
import torch
from composer import Trainer
from composer.core import Callback, Event, State
from composer.loggers import InMemoryLogger, Logger
from composer.models import HuggingFaceModel
from composer.optim import DecoupledAdamW
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

from drpruning_composer import L0MaskAlgorithm
from drpruning_composer.pruning.export import main as export_main

os.environ.setdefault('HF_HUB_OFFLINE', '1')

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)
TARGET = dict(num_hidden_layers=1, hidden_size=24, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=32)


class RecordLosses(Callback):
    """Every microbatch loss dict, detached."""

    def __init__(self):
        self.losses: list[dict[str, torch.Tensor]] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOSS:
            self.losses.append({k: v.detach().clone() for k, v in state.loss.items()})


def _dataloader(num_batches: int = 8) -> DataLoader:
    tokens = torch.randint(0, CONFIG['vocab_size'], (num_batches * 4, 16), generator=torch.Generator().manual_seed(1))
    samples = [{'input_ids': t, 'attention_mask': torch.ones_like(t), 'labels': t} for t in tokens]
    return DataLoader(samples, batch_size=4, shuffle=False)


def _trainer(algorithm: L0MaskAlgorithm, max_duration: str, num_batches: int = 8,
             **kwargs) -> tuple[Trainer, RecordLosses]:
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    config._attn_implementation = 'eager'
    model = HuggingFaceModel(AutoModelForCausalLM.from_config(config), use_logits=True)
    recorder = RecordLosses()
    trainer = Trainer(model=model, train_dataloader=_dataloader(num_batches), max_duration=max_duration,
                      optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=1e-5),
                      algorithms=[algorithm], callbacks=[recorder, *kwargs.pop('callbacks', [])], device='cpu', precision='fp32', seed=17,
                      progress_bar=False, log_to_console=False, **kwargs)
    return trainer, recorder


def _algorithm(**kwargs) -> L0MaskAlgorithm:
    defaults = dict(target=TARGET, masks=['layer', 'attention', 'mlp', 'head', 'query_head', 'intermediate',
                                          'hidden'], lagrangian_warmup='4ba', mask_lr=0.05, lagrangian_lr=0.05)
    return L0MaskAlgorithm(**{**defaults, **kwargs})


def _mask_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.model.l0_masks.state_dict().items()}


def test_resume_is_bitwise_identical(tmp_path):
    full_export = tmp_path / 'full_export'
    full, full_losses = _trainer(_algorithm(export_dir=str(full_export)), '6ba')
    full.fit()

    save = dict(save_folder=str(tmp_path / 'ckpt'), save_interval='3ba', run_name='resume', autoresume=True,
                save_overwrite=False)
    first, first_losses = _trainer(_algorithm(), '6ba', **save)
    first.fit(duration='3ba')
    first.close()
    second, second_losses = _trainer(_algorithm(), '6ba', **save)
    assert int(second.state.timestamp.batch) == 3
    second.fit()

    resumed_losses = first_losses.losses + second_losses.losses
    assert len(resumed_losses) == len(full_losses.losses) == 6
    for a, b in zip(full_losses.losses, resumed_losses):
        assert a.keys() == b.keys() == {'total', 'lm', 'lagrangian'}
        assert all(torch.equal(a[k], b[k]) for k in a)
    mask_full, mask_resumed = _mask_state(full), _mask_state(second)
    assert mask_full.keys() == mask_resumed.keys() and any('lambda_1' in k for k in mask_full)
    assert all(torch.equal(mask_full[k], mask_resumed[k]) for k in mask_full)

    buffer = io.BytesIO()
    torch.save(second.state.algorithms[0].state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)['hparams']['target'] == TARGET

    # The CLI exports the resumed run's last checkpoint to exactly what the uninterrupted run wrote at FIT_END.
    cli_export = tmp_path / 'cli_export'
    export_main([str(tmp_path / 'ckpt' / 'ep0-ba6-rank0.pt'), str(cli_export)])
    a, b = load_file(full_export / 'model.safetensors'), load_file(cli_export / 'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a['model.embed_tokens.weight'].shape == (CONFIG['vocab_size'], TARGET['hidden_size'])


def test_lagrangian_drives_expected_size_to_target():
    algorithm = _algorithm(lagrangian_warmup='0ba', mask_lr=0.2, lagrangian_lr=0.05, init_log_alpha=2.0)
    logger = InMemoryLogger()
    trainer, _ = _trainer(algorithm, '30ba', num_batches=30, loggers=[logger])
    trainer.fit()
    for name, target in algorithm.masks.final_sparsity.items():
        trajectory = [value for _, value in logger.data[f'l0/expected_sparsity/{name}']]
        if target > 0:  # reaches the target (the multipliers then overshoot and oscillate around it)
            assert min(abs(s - target) for s in trajectory) < 0.15 * abs(trajectory[0] - target), (name, trajectory)
        else:  # a mask type the target keeps whole is pushed back on
            assert trajectory[-1] < 0.2 * trajectory[0], (name, trajectory)
    assert 'loss/train/lagrangian' in logger.data and len(logger.data['l0/expected_params']) == 30
    assert algorithm.expected_num_params() == pytest.approx(logger.data['l0/expected_params'][-1][1])
    assert logger.data['l0/target_sparsity/layer'][-1][1] == pytest.approx(0.5)


@pytest.mark.parametrize('target, match', [({'hidden_size': 33}, 'hidden_size'),
                                           ({'num_attention_heads': 3}, 'num_attention_heads')])
def test_invalid_target_fails_before_training(target, match):
    with pytest.raises(ValueError, match=match):
        _trainer(L0MaskAlgorithm(target=target), '1ba')


def test_missing_required_mask_fails_before_training():
    with pytest.raises(ValueError, match=r"l0_mask.masks lacks \['hidden'\]"):
        _trainer(L0MaskAlgorithm(target={'hidden_size': 16}, masks=['layer']), '1ba')


def test_gate_noise_is_keyed_by_seed_rank_batch_and_microbatch():
    """Training gates depend on (seed, rank, batch, microbatch) only, not on the global RNG: resumes replay them."""
    from drpruning_composer.pruning.masks import L0Masks
    from drpruning_composer.pruning.structure import BiasLayout, ModelShape, resolve_target

    source = ModelShape.from_config(LlamaConfig(**CONFIG))
    masks = L0Masks(source, resolve_target(source, TARGET), ['head', 'intermediate', 'hidden'], BiasLayout())

    def draw(*key: int, microbatches: int = 1) -> list[torch.Tensor]:
        masks.key_noise(*key)
        torch.manual_seed(len(key) + microbatches)  # the global RNG must not matter
        return [masks()['intermediate'].clone() for _ in range(microbatches)]

    first, second = draw(17, 0, 5, microbatches=2)
    assert torch.equal(first, draw(17, 0, 5)[0]) and not torch.equal(first, second)
    assert not torch.equal(first, draw(17, 1, 5)[0]) and not torch.equal(first, draw(17, 0, 6)[0])
    assert 0 < first.mean() < 1


def test_per_layer_penalty_is_zero_exactly_when_every_row_meets_the_target():
    from drpruning_composer.pruning.masks import lagrangian

    one, zero = torch.ones(1), torch.zeros(1)
    on_target = torch.tensor([0.5, 0.5, 0.5, 0.5])
    spreads = [torch.tensor([0.5 - d, 0.5 + d, 0.5 - d, 0.5 + d]) for d in (0.05, 0.1, 0.2)]
    assert lagrangian(on_target, 0.5, zero, one).item() == 0.0
    quadratic = [lagrangian(rows, 0.5, zero, one).item() for rows in spreads]
    assert 0 < quadratic[0] < quadratic[1] < quadratic[2]  # same mean sparsity, growing spread
    assert lagrangian(spreads[0].mean().view(1), 0.5, zero, one).item() == pytest.approx(0.0, abs=1e-12)
    assert lagrangian(spreads[2], 0.3, one, zero).item() == pytest.approx(0.2)  # the linear term sees the mean


def test_hard_finish_trains_the_exported_model_with_frozen_masks(tmp_path):
    """In the hard finish the masks and multipliers stop moving, and the masked model is the exported model."""
    algorithm = _algorithm(hard_finish='3ba', export_dir=str(tmp_path / 'export'))
    logger = InMemoryLogger()
    snapshots = []

    class Snapshot(Callback):
        def run_event(self, event: Event, state: State, logger: Logger) -> None:
            if event == Event.BATCH_END:
                snapshots.append(_mask_state(trainer))

    trainer, _ = _trainer(algorithm, '6ba', loggers=[logger], callbacks=[Snapshot()])
    trainer.fit()
    assert [value for _, value in logger.data['l0/hard_finish']] == [0, 0, 0, 1, 1, 1]
    assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])  # masks learn before
    for later in snapshots[3:]:
        assert all(torch.equal(snapshots[2][k], later[k]) for k in later)  # and are frozen after
    masked = trainer.state.model.model.eval()
    export = AutoModelForCausalLM.from_pretrained(tmp_path / 'export', torch_dtype=torch.float32).eval()
    ids = torch.randint(0, CONFIG['vocab_size'], (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(masked(ids).logits, export(ids).logits, atol=1e-4, rtol=0)
    assert export.config.num_hidden_layers == TARGET['num_hidden_layers']
    exported = sum(p.numel() for n, p in export.named_parameters() if 'embed' not in n and 'lm_head' not in n)
    assert algorithm.expected_num_params() == pytest.approx(exported)
    assert algorithm.target_num_params() == exported


@pytest.mark.parametrize('hard_finish, max_duration, match', [('8sp', '6ba', 'in the unit of max_duration'),
                                                              ('7ba', '6ba', 'longer than max_duration'),
                                                              ('0.2dur', '1ep', 'needs max_duration in ba')])
def test_bad_hard_finish_fails_before_training(hard_finish, max_duration, match):
    trainer, _ = _trainer(_algorithm(hard_finish=hard_finish), max_duration)
    with pytest.raises(ValueError, match=f'l0_mask.hard_finish.*{match}'):
        trainer.fit()


def _source_folder(folder, tie: bool = False) -> None:
    """A source folder as the hub ships one: bfloat16 weights and config, a generation config that is not the one
    derived from config.json (two EOS ids, sampling), a tokenizer with special tokens, a chat template and an extra
    tokenizer file."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG, torch_dtype='bfloat16', bos_token_id=3, eos_token_id=0, tie_word_embeddings=tie)
    AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).save_pretrained(folder)
    GenerationConfig(bos_token_id=3, eos_token_id=[0, 1], do_sample=True, temperature=0.6, top_p=0.9).save_pretrained(
        folder)
    vocab = {'<|end|>': 0, '<|im_end|>': 1, '<pad>': 2, '<s>': 3, **{f'w{i}': i for i in range(4, CONFIG['vocab_size'])}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token='<pad>')),
                                        bos_token='<s>', eos_token='<|im_end|>', pad_token='<pad>',
                                        additional_special_tokens=['<|end|>'])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    tokenizer.save_pretrained(folder)
    (folder / 'vocab.txt').write_text('\n'.join(vocab) + '\n')  # another tokenizer file a source may carry


def _source_trainer(folder, algorithm: L0MaskAlgorithm, **kwargs) -> Trainer:
    """A model loaded as llm-foundry's hf_causal_lm does: float32 master weights from the source folder."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation='eager')
    model = HuggingFaceModel(hf, tokenizer=AutoTokenizer.from_pretrained(folder), use_logits=True)
    return Trainer(model=model, train_dataloader=_dataloader(4), max_duration='4ba',
                   optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=1e-5), algorithms=[algorithm],
                   device='cpu', precision='fp32', seed=17, progress_bar=False, log_to_console=False, **kwargs)


@pytest.mark.parametrize('tie', [False, True])
def test_export_carries_generation_config_tokenizer_and_source_dtype(tmp_path, tie):
    """Issue 20, items 1 and 2: the FIT_END export and `drpruning-export` of a checkpoint (with the source folder gone)
    carry the source's generation_config.json and tokenizer files, in the source's dtype (bfloat16), and equal the
    end-of-training model cast to that dtype; `export_dtype` / `--dtype float32` write the float32 master weights."""
    import json
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    source = tmp_path / 'source'
    _source_folder(source, tie)
    fit_end = tmp_path / 'fit_end'
    trainer = _source_trainer(source, _algorithm(export_dir=str(fit_end), hard_finish='0ba'),
                              save_folder=str(tmp_path / 'ckpt'), save_interval='4ba')
    trainer.fit()
    final = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}
    ckpt = tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'
    shutil.move(source, tmp_path / 'moved')  # the CLI must not need the source folder
    cli, cli32 = tmp_path / 'cli', tmp_path / 'cli32'
    export_main([str(ckpt), str(cli)])
    export_main([str(ckpt), str(cli32), '--dtype', 'float32'])
    moved = tmp_path / 'moved'

    expected_generation = json.loads((moved / 'generation_config.json').read_text())
    for out in (fit_end, cli, cli32):
        assert json.loads((out / 'generation_config.json').read_text()) == expected_generation
        loaded = GenerationConfig.from_pretrained(out)
        assert (loaded.eos_token_id, loaded.do_sample, loaded.temperature, loaded.top_p) == ([0, 1], True, 0.6, 0.9)
        for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt'):
            assert (out / name).read_bytes() == (moved / name).read_bytes(), name
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.eos_token == '<|im_end|>' and '<|end|>' in tokenizer.additional_special_tokens
        assert tokenizer.apply_chat_template([{'role': 'user', 'content': 'w5'}], tokenize=False) == 'w5<|im_end|>'
        model = AutoModelForCausalLM.from_pretrained(out, torch_dtype='auto')
        assert model.generation_config.eos_token_id == [0, 1] and model.generation_config.do_sample
        assert model.config.tie_word_embeddings == tie
        if tie:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    def weights(out):
        return load_file(out / 'model.safetensors')

    bf16, bf16_cli, fp32 = weights(fit_end), weights(cli), weights(cli32)
    assert json.loads((fit_end / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
    assert json.loads((cli32 / 'config.json').read_text())['torch_dtype'] == 'float32'
    assert all(v.dtype == torch.bfloat16 for v in bf16.values()) and all(v.dtype == torch.float32 for v in fp32.values())
    assert bf16.keys() == bf16_cli.keys() == fp32.keys()
    assert all(torch.equal(bf16[k], bf16_cli[k]) and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in bf16)
    # the float32 export is the end-of-training model under the final masks, bit for bit
    from drpruning_composer.pruning.export import export_pruned_model

    algorithm = trainer.state.algorithms[0]
    direct = export_pruned_model(final, algorithm.source_config, TARGET, tmp_path / 'direct', dtype=torch.float32)
    assert all(torch.equal(v, fp32[k]) for k, v in weights(direct).items())
