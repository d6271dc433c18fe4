"""Every shipped YAML loads, resolves, names only registered components and known keys, and its pruning target
is valid for its source model; every MCLI launch file passes MCLI's offline validation. Nothing is run."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf as om

from conftest import NO_WEIGHTS_REFERENCE, REPO
from drpruning_composer.config_check import check_components, check_dro, load_and_check
from drpruning_composer.data.demo_corpus import tiny_llama_config

# Published Hugging Face configs of the source models (the fields pruning needs).
LLAMA2_7B = {'model_type': 'llama', 'hidden_size': 4096, 'num_hidden_layers': 32, 'num_attention_heads': 32,
             'num_key_value_heads': 32, 'intermediate_size': 11008, 'vocab_size': 32000}
LLAMA31_8B = {'model_type': 'llama', 'hidden_size': 4096, 'num_hidden_layers': 32, 'num_attention_heads': 32,
              'num_key_value_heads': 8, 'intermediate_size': 14336, 'vocab_size': 128256}
CLUSTER = {'prune_1.3b.yaml': (LLAMA2_7B, (24, 2048, 16, 16, 5504)),
           'prune_2.7b.yaml': (LLAMA2_7B, (32, 2560, 20, 20, 6912)),
           'prune_llama3_8b_to_3b.yaml': (LLAMA31_8B, (28, 3072, 24, 8, 8192)),
           'prune_llama3_8b_to_3b_distill.yaml': (LLAMA31_8B, (28, 3072, 24, 8, 8192))}
FIELDS = ('num_hidden_layers', 'hidden_size', 'num_attention_heads', 'num_key_value_heads', 'intermediate_size')
EVAL_YAML = 'eval_downstream.yaml'
ALL_YAMLS = sorted(p.relative_to(REPO / 'yamls').as_posix() for p in (REPO / 'yamls').rglob('*.yaml')
                   if p.name != EVAL_YAML)


def _load(name: str):
    cfg = om.load(REPO / 'yamls' / name)
    om.resolve(cfg)
    return cfg


@pytest.mark.parametrize('name', ALL_YAMLS)
def test_yaml_keys_and_components(name, tmp_path):
    from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS

    cfg = _load(name)
    dro = (cfg.get('callbacks') or {}).get('dro_reweight') or {}
    if dro.get('reference_loss') == 'teacher' and not Path(cfg.model.pretrained_model_name_or_path).is_dir():
        # The source (a cluster path, or the demo's pretraining output) is absent here: the pre-flight's check of
        # the teacher reference needs a folder with weights, so it gets a stand-in.
        (tmp_path / 'model.safetensors').touch()
        cfg.model.pretrained_model_name_or_path = str(tmp_path)
    assert set(cfg) <= set(TRAIN_CONFIG_KEYS), f'unknown top-level keys {set(cfg) - set(TRAIN_CONFIG_KEYS)}'
    check_components(cfg)
    labels = [loader.label for loader in cfg.eval_loader]
    if 'dro_reweight' in (cfg.get('callbacks') or {}):
        from drpruning_composer import DROReweightCallback

        dro = cfg.callbacks.dro_reweight
        DROReweightCallback(**om.to_container(dro))
        assert list(dro.domains) == labels == list(cfg.train_loader.dataset.domains)
        check_dro(cfg)
    if 'distill' in (cfg.get('algorithms') or {}):
        from drpruning_composer.distill.algorithm import DistillationAlgorithm

        options = om.to_container(cfg.algorithms.distill)
        teacher = options.pop('teacher', None)  # a cluster folder, absent here
        DistillationAlgorithm(**options)
        assert teacher != cfg.model.pretrained_model_name_or_path  # a named teacher is not the student itself


@pytest.mark.parametrize('name', sorted(CLUSTER))
def test_cluster_pruning_target_matches_source(name):
    from drpruning_composer import L0MaskAlgorithm

    cfg = _load(name)
    source, expected = CLUSTER[name]
    target = dict(cfg.algorithms.l0_mask.target)
    assert tuple(target[f] for f in FIELDS) == expected
    L0MaskAlgorithm(**om.to_container(cfg.algorithms.l0_mask)).resolve(source)
    assert cfg.precision == 'amp_bf16' and cfg.fsdp_config.sharding_strategy == 'FULL_SHARD'
    assert cfg.fsdp_config.use_orig_params  # the mask / multiplier param groups need it under FSDP1


def test_demo_pruning_halves_the_source():
    from transformers import LlamaConfig, LlamaForCausalLM

    from drpruning_composer import L0MaskAlgorithm
    from drpruning_composer.evaluate import non_embedding_params

    source = tiny_llama_config(512, 0, 1)
    cfg = _load('demo/prune.yaml')
    L0MaskAlgorithm(**om.to_container(cfg.algorithms.l0_mask)).resolve(source)
    target = {**source, **cfg.algorithms.l0_mask.target}
    size = {k: non_embedding_params(LlamaForCausalLM(LlamaConfig(**c))) for k, c in (('s', source), ('t', target))}
    assert 0.4 < size['t'] / size['s'] < 0.6, size


@pytest.mark.parametrize('name', ['prune.yaml', 'continue.yaml'])
def test_demo_yaml_documents_a_distillation_override_that_passes_preflight(tiny_demo, tmp_path, name):
    """The override line in the demo YAML's header turns on `distill` (teacher: the unpruned source); with the
    teacher reference the header also names, the pre-flight check and both components accept it."""
    import shlex

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from drpruning_composer import DROReweightCallback
    from drpruning_composer.distill.algorithm import DistillationAlgorithm

    text = (REPO / 'yamls' / 'demo' / name).read_text()
    line = next(line for line in text.splitlines() if line.startswith(f'#   composer train.py yamls/demo/{name} '))
    overrides = [*shlex.split(line)[4:], 'callbacks.dro_reweight.reference_loss=teacher']
    demo = tmp_path / 'demo'  # a demo folder with the models the stages before this one write
    demo.mkdir()
    (demo / 'data').symlink_to(tiny_demo / 'data')
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama'))
    for folder in ('runs/source/huggingface/model', 'runs/prune-dro/pruned_hf'):
        model.save_pretrained(demo / folder)
        AutoTokenizer.from_pretrained(tiny_demo / 'tiny_llama').save_pretrained(demo / folder)
    cfg = load_and_check(str(REPO / 'yamls' / 'demo' / name), [f'variables.demo={demo}', 'variables.max_seq_len=64',
                                                                  *overrides])
    distill = DistillationAlgorithm(**om.to_container(cfg.algorithms.distill))
    assert distill.alpha == 0.5 and cfg.callbacks.dro_reweight.reference_loss == 'teacher'
    assert (distill.teacher_path or cfg.model.pretrained_model_name_or_path) == str(
        demo / 'runs/source/huggingface/model')
    DROReweightCallback(**om.to_container(cfg.callbacks.dro_reweight))


PRUNE = str(REPO / 'yamls' / 'demo' / 'prune.yaml')


def _prune_base(demo: Path) -> list[str]:
    return [f'variables.demo={demo}', f'variables.source_model={demo}/tiny_llama', 'variables.max_seq_len=64',
            NO_WEIGHTS_REFERENCE]


@pytest.mark.parametrize('override, key', [
    ('callbacks.dro_reweight.min_fit_points=3', 'callbacks.dro_reweight.min_fit_points'),
    ('callbacks.dro_reweight.rho=-1', 'callbacks.dro_reweight.rho'),
    ("callbacks.dro_reweight.history_folder='out/{run}/dro'", 'callbacks.dro_reweight.history_folder'),
    ('callbacks.dro_reweight.reference_ratio=[0.5,0.5]', 'callbacks.dro_reweight.reference_ratio'),
    ('callbacks.dro_reweight.rho_max=1', 'callbacks.dro_reweight.rho_max'),
    ('callbacks.dro_reweight.weight_lag_batches=-1', 'callbacks.dro_reweight.weight_lag_batches'),
    ('algorithms.l0_mask.eval_mode=hard', 'algorithms.l0_mask.eval_mode'),
    ('algorithms.l0_mask.masks=[layer,wings]', 'algorithms.l0_mask.masks'),
    ('algorithms.l0_mask.target.hidden_dim=8', 'algorithms.l0_mask.target'),
    ('algorithms.l0_mask.hard_finish=2ep', 'algorithms.l0_mask.hard_finish'),
    ('algorithms.l0_mask.export_dtype=int8', 'algorithms.l0_mask.export_dtype'),
    ('algorithms.distill.alpha=2', 'algorithms.distill.alpha'),
    ('algorithms.distill.teacher_dtype=int8', 'algorithms.distill.teacher_dtype'),
    ('algorithms.distill.teacher=/nonexistent/teacher', 'algorithms.distill.teacher'),
])
def test_component_option_errors_fail_before_training(tiny_demo, override, key):
    """Issue 20, item 11: the pre-flight check constructs dro_reweight, l0_mask and distill from their options
    (without a model), so an option error names its key before the model loads."""
    from drpruning_composer.config_check import ConfigError

    with pytest.raises(ConfigError, match=rf'^{re.escape(key)}: '):
        load_and_check(PRUNE, [*_prune_base(tiny_demo), override])


def test_weight_lag_below_the_prefetch_fails_before_training(tiny_demo):
    from drpruning_composer.config_check import ConfigError

    workers = ['train_loader.num_workers=2', 'train_loader.prefetch_factor=2']
    with pytest.raises(ConfigError, match=r"^callbacks.dro_reweight.weight_lag_batches: 3 is less than the train "
                                          r"loader's prefetch of 4 batches"):
        load_and_check(PRUNE, [*_prune_base(tiny_demo), *workers, 'callbacks.dro_reweight.weight_lag_batches=3'])
    load_and_check(PRUNE, [*_prune_base(tiny_demo), *workers, 'callbacks.dro_reweight.weight_lag_batches=4'])


def test_distill_teacher_with_another_vocabulary_fails_before_training(tiny_demo, tmp_path):
    from transformers import AutoConfig

    from drpruning_composer.config_check import ConfigError

    config = AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')
    config.vocab_size += 1
    config.save_pretrained(tmp_path / 'teacher')
    with pytest.raises(ConfigError, match=r'^algorithms.distill.teacher: .* vocabulary of 513, the student 512'):
        load_and_check(PRUNE, [*_prune_base(tiny_demo), f'algorithms.distill.teacher={tmp_path}/teacher'])


@pytest.mark.parametrize('overrides, key, message', [
    # dynamic_mixture has no length: anything in epochs fails after the model loads, or never comes
    (['max_duration=2ep'], 'max_duration', 'is in epochs, but train_loader dynamic_mixture is an endless stream'),
    (['max_duration=2'], 'max_duration', 'is in epochs'),  # an integer is epochs, as Composer reads it
    (['eval_interval=1ep'], 'eval_interval', 'is in epochs'),
    (['save_interval=1ep'], 'save_interval', 'is in epochs'),
    (['scheduler.t_warmup=1ep'], 'scheduler.t_warmup', 'is in epochs'),
    (['algorithms.l0_mask.lagrangian_warmup=1ep'], 'algorithms.l0_mask.lagrangian_warmup', 'never warm up'),
    # l0_mask's schedule against max_duration, as checked at FIT_START
    (['algorithms.l0_mask.hard_finish=400ba'], 'algorithms.l0_mask.hard_finish', 'longer than max_duration'),
    (['algorithms.l0_mask.hard_finish=2000sp'], 'algorithms.l0_mask.hard_finish', 'in the unit of max_duration'),
    (['max_duration=2ep', 'train_subset_num_batches=10'], 'algorithms.l0_mask.hard_finish',
     'needs max_duration in ba, sp or tok'),
    (['max_duration=300bx'], 'max_duration', 'not a Composer time string'),
    (['max_duration=0.5dur'], 'max_duration', 'fraction of itself'),
])
def test_time_options_that_fail_later_fail_before_training(tiny_demo, overrides, key, message):
    """Issue 20, item 9: `max_duration` in epochs with dynamic_mixture passed the pre-flight check and failed after
    the model loaded ('Cannot convert time, as state.dataloader_len is None'); so did every other time option."""
    from drpruning_composer.config_check import ConfigError

    with pytest.raises(ConfigError, match=rf'^{re.escape(key)}: .*{message}'):
        load_and_check(PRUNE, [*_prune_base(tiny_demo), *overrides])


def test_time_options_in_epochs_pass_where_epochs_have_a_length(tiny_demo):
    from drpruning_composer.config_check import ConfigError, check_config

    # train_subset_num_batches gives dynamic_mixture's epochs a length
    load_and_check(PRUNE, [*_prune_base(tiny_demo), 'max_duration=2ep', 'train_subset_num_batches=10',
                           'eval_interval=1ep', 'algorithms.l0_mask.hard_finish=0ba'])
    cfg = load_and_check(PRUNE, _prune_base(tiny_demo))
    del cfg['eval_interval']  # llm-foundry's default, 1 (epoch), would never evaluate: DRO would never reweight
    with pytest.raises(ConfigError, match=r"^eval_interval: 1 \(llm-foundry's default: 1 epoch\) is in epochs"):
        check_config(cfg)


@pytest.mark.parametrize('overrides, refused', [
    ([], True),
    (['callbacks.dro_reweight.update=sheared', 'callbacks.dro_reweight.sheared_smoothing=0'], True),
    (['callbacks.dro_reweight.update=sheared'], False),  # its uniform smoothing gives every domain weight
    (['callbacks.dro_reweight.update=constant'], False),  # the domain is only evaluated
    (['callbacks.dro_reweight.reference_ratio=[0.4,0.2,0.2,0.2]'], False),  # `dro` reads this positive ratio
    # ...but the YAML's mirror step starts from the mixture's weights: without a floor a 0 stays 0
    (['callbacks.dro_reweight.reference_ratio=[0.4,0.2,0.2,0.2]', 'callbacks.dro_reweight.min_prob=0.0'], True),
])
def test_domain_at_proportion_zero_fails_before_training(tiny_demo, overrides, refused):
    """Issue 20, item 5: with DRO a domain at proportion 0 could never gain weight; refused before the model loads,
    with the reason and what to do."""
    from drpruning_composer.config_check import ConfigError

    args = [*_prune_base(tiny_demo), 'train_loader.dataset.proportions=[0.5,0.3,0.2,0.0]', *overrides]
    if refused:
        with pytest.raises(ConfigError, match=r"^train_loader.dataset.proportions: \['records'\] start at proportion "
                                             r'0, .*can never gain weight.* small positive proportion'):
            load_and_check(PRUNE, args)
    else:
        load_and_check(PRUNE, args)


@pytest.mark.parametrize('path', sorted((REPO / 'launch').glob('*.yaml')), ids=lambda p: p.name)
def test_mcli_launch_file_validates(path: Path):
    from mcli.api.runs import RunConfig
    from mcli.models.run_config import FinalRunConfig

    run = FinalRunConfig.finalize_config(RunConfig.from_file(str(path)))
    yaml = path.name
    assert f'yamls/{yaml}' in run.command and (REPO / 'yamls' / yaml).is_file()


def _fake_task_rows(task: dict, n: int = 40) -> list[dict]:
    """Rows in the format of llm-foundry's task files, for each task type the eval YAML uses."""
    kind = task['icl_task_type']
    if kind == 'schema':
        return [{'context_options': [f'The cup {i} is', f'The jar {i} is'], 'continuation': 'full.', 'gold': i % 2}
                for i in range(n)]
    if kind == 'language_modeling':
        return [{'context': f'One two three {i}', 'continuation': ' four'} for i in range(n)]
    return [{'query': f'Question {i}: which?', 'choices': ['yes', 'no'], 'gold': i % 2, 'category': f'c{i % 2}'}
            for i in range(n)]


def test_eval_downstream_yaml_runs_llmfoundry_eval_on_local_task_files(tiny_demo, tmp_path):
    """`llmfoundry eval yamls/eval_downstream.yaml` on a tiny model, with task files of the same names and formats as
    llm-foundry's local_data written here: every task of the suite is built and reports its metric."""
    import json
    import os
    import re
    import subprocess

    from llmfoundry.utils.config_utils import EVAL_CONFIG_KEYS
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = om.load(REPO / 'yamls' / EVAL_YAML)
    assert set(cfg) <= set(EVAL_CONFIG_KEYS), set(cfg) - set(EVAL_CONFIG_KEYS)
    local = tmp_path / 'local_data'
    for task in om.to_container(cfg.icl_tasks):
        path = Path(task['dataset_uri'].replace('${variables.local_data}', str(local)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(''.join(json.dumps(row) + '\n' for row in _fake_task_rows(task)))
    model = tmp_path / 'model'
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_demo / 'tiny_llama').save_pretrained(model)
    proc = subprocess.run(['llmfoundry', 'eval', str(REPO / 'yamls' / EVAL_YAML), f'variables.model={model}',
                           f'variables.local_data={local}', 'variables.max_seq_len=64', 'precision=fp32',
                           'icl_subset_num_batches=1'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for task in cfg.icl_tasks:
        assert re.search(rf'metrics/{task.label}/{task.num_fewshot[0]}-shot/', log), task.label
