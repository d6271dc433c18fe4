"""Pre-flight checks of a training YAML, so that mistakes fail in seconds instead of after model loading.

Checked: every component name resolves in llm-foundry's registries; every local data folder exists (with its
split); a local model or tokenizer path holds a Hugging Face config / tokenizer; with ``HF_HUB_OFFLINE=1`` a model
or tokenizer must be local. Each error names the YAML key at fault.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, ListConfig
from omegaconf import OmegaConf as om


class ConfigError(ValueError):
    """A training YAML that cannot run; the message starts with the offending key."""


# YAML key -> llm-foundry registry names that may hold the component
_COMPONENT_KEYS = {
    'callbacks': ('callbacks', 'callbacks_with_config'),
    'algorithms': ('algorithms',),
    'loggers': ('loggers',),
}


def _offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes')


def _looks_local(path: str) -> bool:
    """True for what can only be a filesystem path (a hub id is `name` or `org/name`)."""
    return os.path.exists(path) or path.startswith(('/', '.', '~')) or path.count('/') >= 2


def _registered(registry_names: Sequence[str], name: str) -> bool:
    from llmfoundry import registry

    return any(name in getattr(registry, r) for r in registry_names)


def check_components(cfg: DictConfig) -> None:
    for key, registries in _COMPONENT_KEYS.items():
        for name in (cfg.get(key) or {}):
            if not _registered(registries, str(name)):
                raise ConfigError(f'{key}.{name}: no {key[:-1]} named "{name}" is registered '
                                  '(check the spelling, or install the package that provides it)')
    single = {'model': 'models', 'optimizer': 'optimizers', 'scheduler': 'schedulers', 'train_loader': 'dataloaders'}
    for key, registry_name in single.items():
        name = (cfg.get(key) or {}).get('name')
        if name is not None and not _registered((registry_name,), str(name)):
            raise ConfigError(f'{key}.name: no {registry_name[:-1]} named "{name}" is registered')
    for key, loader in _eval_loaders(cfg):
        if loader.get('name') is not None and not _registered(('dataloaders',), str(loader['name'])):
            raise ConfigError(f'{key}.name: no dataloader named "{loader["name"]}" is registered')


def _eval_loaders(cfg: DictConfig) -> Iterator[tuple[str, Any]]:
    for key in ('eval_loader', 'eval_loaders'):
        loaders = cfg.get(key)
        if isinstance(loaders, ListConfig):
            for i, loader in enumerate(loaders):
                yield f'{key}[{i}]', loader
        elif loaders is not None:
            yield key, loaders


def _local_dirs(node: Any, key: str, split: str | None) -> Iterator[tuple[str, str]]:
    """(key, folder) for every `local` path of a dataset config that has no `remote` to download from."""
    if not isinstance(node, DictConfig):
        return
    split = node.get('split', split)
    if node.get('local') is not None and node.get('remote') is None:
        local = str(node['local'])
        if node.get('domains'):  # dynamic_mixture: one MDS folder per domain under `local`
            for domain in node['domains']:
                yield f'{key}.local', os.path.join(local, str(domain), split or 'train')
        else:
            yield f'{key}.local', os.path.join(local, split) if split else local
    for name, child in (node.get('streams') or {}).items():
        yield from _local_dirs(child, f'{key}.streams.{name}', split)


def check_data(cfg: DictConfig) -> None:
    loaders = [('train_loader', cfg.get('train_loader'))] + list(_eval_loaders(cfg))
    for key, loader in loaders:
        if not isinstance(loader, DictConfig) or not isinstance(loader.get('dataset'), DictConfig):
            continue
        for k, folder in _local_dirs(loader['dataset'], f'{key}.dataset', None):
            if not os.path.isdir(folder):
                raise ConfigError(f'{k}: data folder {folder} does not exist')
            if loader.get('name') == 'instruct' and not _has_loss_mask(folder):
                raise ConfigError(f'{k}: {folder} is not instruction data (no loss_mask column); the instruct loader '
                                  'reads what drpruning-prepare --instruct writes')


def _has_loss_mask(folder: str) -> bool:
    index = os.path.join(folder, 'index.json')
    if not os.path.isfile(index):
        return True  # the loader itself reports a folder without shards
    with open(index) as f:
        shards = json.load(f)['shards']
    return bool(shards) and 'loss_mask' in shards[0].get('column_names', [])


def check_icl_tasks(cfg: DictConfig) -> None:
    """`icl_tasks` given as a file (e.g. drpruning-make-tasks' tasks.yaml) must exist, and so must each local task."""
    tasks = cfg.get('icl_tasks')
    if isinstance(tasks, str):
        if not os.path.isfile(tasks):
            raise ConfigError(f'icl_tasks: {tasks} does not exist (drpruning-make-tasks --data DATA --tokenizer TOK '
                              '--out DIR writes DIR/tasks.yaml)')
        tasks = om.load(tasks).get('icl_tasks') or []
    for i, task in enumerate(tasks or []):
        uri = str(task.get('dataset_uri', ''))
        if '://' not in uri and not os.path.isfile(uri):
            raise ConfigError(f'icl_tasks[{i}].dataset_uri: {uri} does not exist')


def check_model_paths(cfg: DictConfig) -> None:
    model_path = (cfg.get('model') or {}).get('pretrained_model_name_or_path')
    tokenizer_name = (cfg.get('tokenizer') or {}).get('name')
    for key, path, marker in (('model.pretrained_model_name_or_path', model_path, 'config.json'),
                              ('tokenizer.name', tokenizer_name, None)):
        if path is None:
            continue
        path = str(path)
        if _looks_local(path):
            p = Path(path).expanduser()
            if not p.is_dir():
                raise ConfigError(f'{key}: model folder {path} does not exist')
            if marker and not (p / marker).is_file():
                raise ConfigError(f'{key}: {path} has no {marker} (not a Hugging Face model folder)')
            if marker is None and not any((p / f).is_file() for f in ('tokenizer.json', 'tokenizer_config.json')):
                raise ConfigError(f'{key}: {path} has no tokenizer files')
        elif _offline():
            raise ConfigError(f'{key}: "{path}" is not a local folder and HF_HUB_OFFLINE=1 forbids downloading it')


def check_dro(cfg: DictConfig) -> None:
    """`dro_reweight` domains must be the mixture's domains, each with an eval loader labelled by it."""
    from drpruning_composer.dro.callback import check_domains

    dro = (cfg.get('callbacks') or {}).get('dro_reweight')
    if dro is None:
        return
    domains = list(dro.get('domains') or [])
    dataset = (cfg.get('train_loader') or {}).get('dataset') or {}
    if cfg.train_loader.get('name') != 'dynamic_mixture':
        raise ConfigError('callbacks.dro_reweight: needs train_loader.name: dynamic_mixture, '
                          f'got {cfg.train_loader.get("name")!r}')
    if dro.get('reference_loss') == 'source' and not is_true(cfg.get('eval_first')):
        raise ConfigError('callbacks.dro_reweight.reference_loss: source is the loss of the first evaluation; set '
                          'eval_first: true so that it is the unchanged source model, evaluated before the first batch')
    labels = [str(loader.get('label')) for _, loader in _eval_loaders(cfg)]
    if dro.get('reference_loss') == 'teacher':
        check_teacher_reference(cfg, labels, is_true(dro.get('use_train_loss_ema', False)))
    try:
        check_domains(domains, list(dataset.get('domains') or []), labels, bool(dro.get('use_train_loss_ema', False)))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_teacher_reference(cfg: DictConfig, eval_labels: Sequence[str], use_train_loss_ema: bool) -> None:
    """`reference_loss: teacher` is measured on the eval loaders, with `distill`'s teacher or the source weights."""
    key = 'callbacks.dro_reweight.reference_loss'
    if not eval_labels or use_train_loss_ema:
        raise ConfigError(f'{key}: teacher is the teacher\'s loss on the eval loaders; it needs one eval_loader per '
                          'domain (labelled by it), and not use_train_loss_ema')
    if 'distill' in (cfg.get('algorithms') or {}):
        return  # the distill algorithm's teacher; `distill` checks its folder
    source = str((cfg.get('model') or {}).get('pretrained_model_name_or_path', ''))
    folder = Path(source).expanduser()
    if not source or not any(f.suffix in ('.safetensors', '.bin') for f in folder.glob('*')):
        raise ConfigError(f'{key}: teacher without algorithms.distill is the source model '
                          f'model.pretrained_model_name_or_path, but {source!r} is not a local folder with weights '
                          '(*.safetensors or *.bin)')


def is_true(value: Any) -> bool:
    """A YAML flag that is on (true, or the string `true` from an override)."""
    return value is True or str(value).lower() == 'true'


def check_resume(cfg: DictConfig, allow_no_autoresume: bool = False) -> str | None:
    """A run that saves checkpoints must resume when restarted: raise ConfigError, or return a warning.

    llm-foundry 0.22.0 logs that it changes autoresume's default to True but never does: without `autoresume: true`
    a restarted run starts again at batch 0 and Composer's checkpoint saver stops it before its first batch
    (FileExistsError), unless `save_overwrite: true` lets it overwrite its checkpoints (a warning then).
    """
    save_folder = cfg.get('save_folder')
    if is_true(cfg.get('autoresume')):
        if save_folder is None:
            raise ConfigError('autoresume: true needs a save_folder to resume from')
        if cfg.get('run_name') is None and not os.environ.get('RUN_NAME'):
            raise ConfigError('autoresume: true needs a run_name (or RUN_NAME in the environment): Composer finds '
                              'the checkpoints of a run by its name')
        return None
    if save_folder is None:
        return None
    if is_true(cfg.get('save_overwrite')):
        return (f'save_folder {save_folder} is set without autoresume: true, so a restarted run starts again at '
                'batch 0 and overwrites its checkpoints (save_overwrite: true)')
    if allow_no_autoresume:
        return (f'save_folder {save_folder} is set without autoresume: true: a restarted run will start at batch 0 '
                "and Composer's checkpoint saver will stop it before its first batch (FileExistsError)")
    raise ConfigError(f'autoresume: save_folder {save_folder} is set but autoresume is not true, so a restarted run '
                      "would not resume: it would start at batch 0 and Composer's checkpoint saver would stop it "
                      'before its first batch (FileExistsError). Set '
                      'autoresume=true (llm-foundry 0.22.0 does not turn it on by itself), or pass '
                      '--allow-no-autoresume to run anyway')


# YAML key -> 'module:class' of this project's components whose options the pre-flight check validates by
# constructing them (without a model): every option error then names its key before anything loads.
_OPTION_COMPONENTS = {
    'callbacks.dro_reweight': 'drpruning_composer.dro.callback:DROReweightCallback',
    'algorithms.l0_mask': 'drpruning_composer.pruning.algorithm:L0MaskAlgorithm',
    'algorithms.distill': 'drpruning_composer.distill.algorithm:DistillationAlgorithm',
}


def _option_key(key: str, options: Sequence[str], message: str, default: str | None = None) -> str:
    """`key.option` for the option a component's error message names first (`key.default`, or `key`, if none)."""
    import re

    found = [(m.start(), name) for name in options if (m := re.search(rf'(?<![\w.]){re.escape(name)}\b|'
                                                                       rf'\.{re.escape(name)}\b', message))]
    name = min(found)[1] if found else default
    return f'{key}.{name}' if name else key


def build_component(key: str, options: Any) -> Any:
    """Construct the component at YAML `key` (e.g. `callbacks.dro_reweight`) from its options, as llm-foundry will
    after the model loads; raise ConfigError naming `key.option` for an unknown, missing or invalid option."""
    import inspect

    from drpruning_composer.registry import _load

    cls = _load(_OPTION_COMPONENTS[key])
    kwargs = om.to_container(options, resolve=True) if isinstance(options, DictConfig) else dict(options or {})
    params = inspect.signature(cls.__init__).parameters
    names = [n for n in params if n != 'self']
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ConfigError(f'{key}.{unknown[0]}: no such option (options: {", ".join(names)})')
    missing = [n for n in names if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f'{key}.{missing[0]}: required')
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f'{_option_key(key, names, str(e))}: {e}') from e


def _source_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The source model's config.json (with `model.config_overrides`), if the model is a local folder."""
    model = cfg.get('model') or {}
    path = model.get('pretrained_model_name_or_path')
    config = Path(str(path)).expanduser() / 'config.json' if path is not None else None
    if config is None or not config.is_file():
        return None
    with open(config) as f:
        fields = json.load(f)
    overrides = model.get('config_overrides')
    if overrides:
        fields.update(om.to_container(overrides, resolve=True) if isinstance(overrides, DictConfig) else overrides)
    return fields


def check_component_options(cfg: DictConfig) -> None:
    """Construct `dro_reweight`, `l0_mask` and `distill` from their options, as llm-foundry does after the model
    loads, and check a named `distill` teacher's vocabulary against the source model's config.

    (`l0_mask`'s target is not checked against the source shape here: the demo recipe's tests run it on a smaller
    fixture source with the target given by overrides after this check.)"""
    source = None
    for key in _OPTION_COMPONENTS:
        group, name = key.split('.')
        section = cfg.get(group) or {}
        if name not in section:
            continue
        component = build_component(key, section[name])
        source = source if source is not None else (_source_config(cfg) or {})
        if name == 'distill' and source and component.teacher_path is not None:
            with open(os.path.join(component.teacher_path, 'config.json')) as f:
                teacher_vocab = json.load(f).get('vocab_size')
            if teacher_vocab != source.get('vocab_size'):
                raise ConfigError(f'{key}.teacher: {component.teacher_path} has a vocabulary of {teacher_vocab}, the '
                                  f'student {source.get("vocab_size")}; the teacher needs the same vocabulary')


def _parse_time(key: str, value: Any) -> Any:
    """A Composer Time from a YAML value (an integer is epochs, as Composer reads it); ConfigError naming `key`."""
    from composer.core import Time, TimeUnit

    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected a time such as 100ba, got {value!r}')
    if isinstance(value, int):
        return Time(value, TimeUnit.EPOCH)
    try:
        return Time.from_timestring(str(value))
    except ValueError as e:
        raise ConfigError(f'{key}: {value!r} is not a Composer time string (e.g. 100ba, 10000sp, 1000000tok, '
                          f'0.5dur): {e}') from e


def endless_train_loader(cfg: DictConfig) -> bool:
    """Whether the train loader has no length, so that no epoch ever ends: `dynamic_mixture` (an infinite stream)
    unless `train_subset_num_batches` gives its epochs a length."""
    subset = cfg.get('train_subset_num_batches')
    has_subset = subset is not None and not isinstance(subset, bool) and int(subset) > 0
    return (cfg.get('train_loader') or {}).get('name') == 'dynamic_mixture' and not has_subset


def check_durations(cfg: DictConfig) -> None:
    """Every time string of the run that can only fail (or never fire) later, checked against max_duration and the
    train loader: in epochs with an endless loader (`dynamic_mixture`), `max_duration` fails after the model loads
    (Composer: 'Cannot convert time, as state.dataloader_len is None') and an eval, save, warm-up or scheduler
    interval never comes; `l0_mask`'s lagrangian_warmup and hard_finish are checked as at FIT_START."""
    from composer.core import TimeUnit

    endless = endless_train_loader(cfg)
    fix = ('dynamic_mixture is an endless stream with no epoch length, so no epoch ever ends: give it in ba, sp or '
           'tok (e.g. 1000ba)')
    max_duration = None
    if cfg.get('max_duration') is not None:
        max_duration = _parse_time('max_duration', cfg.max_duration)
        if max_duration.unit == TimeUnit.DURATION:
            raise ConfigError(f'max_duration: {cfg.max_duration!r} is a fraction of itself; give it in ba, sp or tok')
        if endless and max_duration.unit == TimeUnit.EPOCH:
            raise ConfigError(f'max_duration: {cfg.max_duration!r} is in epochs, but train_loader {fix}')
    intervals = [('save_interval', cfg.get('save_interval'))]
    if list(_eval_loaders(cfg)) or cfg.get('icl_tasks'):
        # llm-foundry's default eval_interval is 1, i.e. one epoch: with an endless loader the run would never
        # evaluate (and dro_reweight never reweight) before its end.
        intervals.append(('eval_interval', cfg.get('eval_interval', 1)))
    scheduler = cfg.get('scheduler') or {}
    intervals += [(f'scheduler.{k}', scheduler[k]) for k in ('t_warmup', 't_max', 't_cooldown') if k in scheduler]
    for key, value in intervals:
        if value is None or (key == 'save_interval' and cfg.get('save_folder') is None):
            continue
        if endless and _parse_time(key, value).unit == TimeUnit.EPOCH:
            shown = f'{value!r}' + (' (llm-foundry\'s default: 1 epoch)' if key not in cfg and '.' not in key else '')
            raise ConfigError(f'{key}: {shown} is in epochs, but train_loader {fix}')
    l0_mask = (cfg.get('algorithms') or {}).get('l0_mask')
    if l0_mask is not None:
        algorithm = build_component('algorithms.l0_mask', l0_mask)
        try:
            algorithm.check_schedule(max_duration, endless_loader=endless)
            algorithm.check_calibration(max_duration)
        except ValueError as e:
            named = re.match(r'l0_mask\.(\w+)', str(e))  # every schedule error starts with the option it is about
            raise ConfigError(f'algorithms.l0_mask.{named.group(1) if named else "hard_finish"}: {e}') from e


def check_dro_proportions(cfg: DictConfig) -> None:
    """A domain that starts at proportion 0 must be able to gain weight under dro_reweight's update rule."""
    from drpruning_composer.dro.callback import check_no_zero_proportion, mixture_weights_bound_dro

    dro = (cfg.get('callbacks') or {}).get('dro_reweight')
    proportions = ((cfg.get('train_loader') or {}).get('dataset') or {}).get('proportions')
    if dro is None or not isinstance(proportions, ListConfig):
        return
    update = str(dro.get('update', 'dro'))
    if not mixture_weights_bound_dro(update, isinstance(dro.get('reference_ratio'), ListConfig),
                                     str(dro.get('dro_step', 'best_response')), float(dro.get('min_prob', 0.1))):
        return  # `dro` reads the fixed reference_ratio (checked with the callback's options), not the proportions
    domains = list(((cfg.get('train_loader') or {}).get('dataset') or {}).get('domains') or [])
    try:
        check_no_zero_proportion(domains, list(proportions), 'train_loader.dataset.proportions', update,
                                 float(dro.get('sheared_smoothing', 1e-4)))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_dro_weight_lag(cfg: DictConfig) -> None:
    """An explicit `dro_reweight.weight_lag_batches` must cover the train loader's prefetch depth
    (`num_workers` x `prefetch_factor` batches), as the callback checks at fit start."""
    dro = (cfg.get('callbacks') or {}).get('dro_reweight')
    lag = None if dro is None else dro.get('weight_lag_batches')
    if lag is None or isinstance(lag, bool) or not isinstance(lag, int):
        return  # unset: the prefetch depth itself; a wrong type is reported with the callback's options
    loader = cfg.get('train_loader') or {}
    workers = int(loader.get('num_workers') or 0)
    prefetch = workers * int(loader.get('prefetch_factor') or 2) if workers else 0
    if prefetch > lag:
        raise ConfigError(f'callbacks.dro_reweight.weight_lag_batches: {lag} is less than the train loader\'s '
                          f'prefetch of {prefetch} batches (num_workers={workers} x prefetch_factor): new weights '
                          'would reach samples already handed to the workers; set it >= the prefetch')


def check_sequence_lengths(cfg: DictConfig) -> None:
    """Each train/eval loader's `dataset.max_seq_len` must match the data drpruning-prepare wrote (its manifest.json
    records the prepared length), for `dynamic_mixture`, `instruct` and `text` loaders over prepared folders.

    Token rows are exactly the prepared length: a shorter max_seq_len would train on the first part of every row
    only (ConfigError); a longer one pads every row of a `text` loader and stops `dynamic_mixture` at its first batch
    (a UserWarning naming the key). Instruction rows are at most the prepared length: a shorter max_seq_len fails at
    the first longer row (ConfigError), a longer one is harmless. Folders without a manifest (other data, remote
    data) are not checked. Raises ConfigError naming the key.
    """
    import warnings

    def folders(loader: Any) -> Iterator[str]:
        dataset = loader.get('dataset')
        split = dataset.get('split')
        if dataset.get('local') is not None and dataset.get('remote') is None:
            local = str(dataset['local'])
            if loader.get('name') == 'dynamic_mixture':
                yield from (os.path.join(local, str(d), split or 'train') for d in (dataset.get('domains') or []))
            else:
                yield os.path.join(local, str(split)) if split else local
        for stream in (dataset.get('streams') or {}).values():
            if isinstance(stream, DictConfig) and stream.get('local') is not None and stream.get('remote') is None:
                stream_split = stream.get('split', split)
                yield os.path.join(str(stream['local']), str(stream_split)) if stream_split else str(stream['local'])

    def manifest_of(folder: str) -> tuple[Path, dict] | None:
        path = Path(folder).expanduser().resolve()
        for parent in list(path.parents)[:3]:
            candidate = parent / 'manifest.json'
            if candidate.is_file():
                try:
                    manifest = json.loads(candidate.read_text(encoding='utf-8-sig'))
                except (OSError, ValueError):
                    return None
                domains = manifest.get('domains') if isinstance(manifest, dict) else None
                domain = path.relative_to(parent).parts[0]
                if isinstance(domains, dict) and domain in domains and 'max_seq_len' in manifest:
                    return candidate, manifest
        return None

    loaders = [('train_loader', cfg.get('train_loader'))] + list(_eval_loaders(cfg))
    for key, loader in loaders:
        if (not isinstance(loader, DictConfig) or loader.get('name') not in ('dynamic_mixture', 'instruct', 'text')
                or not isinstance(loader.get('dataset'), DictConfig) or loader.dataset.get('max_seq_len') is None):
            continue
        length = int(loader.dataset.max_seq_len)
        for folder in folders(loader):
            found = manifest_of(folder)
            if found is None:
                continue
            manifest_path, manifest = found
            prepared = int(manifest['max_seq_len'])
            instruct = manifest.get('format') == 'instruct'
            fix = (f'Set {key}.dataset.max_seq_len={prepared}, or prepare the data again with '
                   f'drpruning-prepare --max-seq-len {length}')
            if length < prepared:
                what = (f'rows of up to {prepared} tokens would fail at the first longer one' if instruct else
                        f'training would read only the first {length} tokens of every {prepared}-token row')
                raise ConfigError(f'{key}.dataset.max_seq_len: {length} is shorter than the prepared rows of {folder} '
                                  f'({manifest_path} records max_seq_len={prepared}): {what}. {fix}')
            if length > prepared and not instruct:
                warnings.warn(f'{key}.dataset.max_seq_len: {length} is longer than the prepared rows of {folder} '
                              f'({manifest_path} records max_seq_len={prepared}): every row would be padded '
                              f'(dynamic_mixture stops at its first batch). {fix}')
                break  # one warning per loader


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first problem found in a resolved training config."""
    check_components(cfg)
    check_model_paths(cfg)
    check_data(cfg)
    check_sequence_lengths(cfg)
    check_icl_tasks(cfg)
    check_dro(cfg)
    check_component_options(cfg)
    check_durations(cfg)
    check_dro_proportions(cfg)
    check_dro_weight_lag(cfg)


def load_and_check(yaml_path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML with command-line overrides (as `train_from_yaml` does), resolve it and check it."""
    if not os.path.isfile(yaml_path):
        raise ConfigError(f'{yaml_path}: no such YAML file')
    cfg = om.load(yaml_path)
    if overrides:
        cfg = om.merge(cfg, om.from_cli(list(overrides)))
    try:
        om.resolve(cfg)
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError(f'{yaml_path}: {e}') from e
    assert isinstance(cfg, DictConfig)
    check_config(cfg)
    return cfg
