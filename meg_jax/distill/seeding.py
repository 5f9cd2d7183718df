"""Seeding a work directory from an exported backbone: continue distilling a shipped checkpoint.

``python -m train.distill --export DIR`` keeps only the weights that ship (the classifier,
the VAE after the decoder stage, the teacher after teacher_ft, the student), not the work
directory they came from. ``seed_workdir`` writes those weights back as finished stages of a
work directory, so later stages run on them exactly as if the earlier stages had run there::

    python -m train.distill --preset tiny --workdir runs/more --init_from checkpoints/tiny \\
        --stage student --student.init_weights checkpoints/tiny --student.steps 150

seeds classifier, vae, decoder, teacher and teacher_ft from ``checkpoints/tiny`` and trains
the student further from the shipped student (without ``--student.init_weights`` it restarts
from the shipped teacher). With ``--stage all`` or ``none`` every enabled stage is seeded and
``--export`` then writes the export back unchanged (bit-identical safetensors).

An export holds one set of weights per component, so stages that share a component get the
same weights: the ``vae`` stage gets the exported VAE (its encoder, which fixes the latent
space and the latent scale, is the VAE stage's; its decoder is the decoder stage's when that
stage ran), and the ``teacher`` stage gets the exported teacher (teacher_ft's weights when
that stage ran). Later stages read only what they would have read anyway (the encoder, the
latent scale, the final teacher), so nothing downstream changes.

Each seeded stage gets ``final/`` (the component's safetensors, copied byte for byte),
``final/DONE``, its ``config.json`` record (``meg_jax.distill.train.stage_record``), and
``seeded.json`` (source folder and sha256 of every file). The export must have been made with
the same architecture, data, sampling and stage steps and seeds as the config (the preset
plus flags): a difference is refused naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from meg_jax import checkpoint as ckpt
from meg_jax import config as config_lib
from meg_jax.distill.config import STAGES, DistillConfig

__all__ = ["seed_workdir", "stages_to_seed", "STAGE_COMPONENTS", "file_sha256"]

# stage -> (exported component, parameter parts it holds)
STAGE_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "classifier": ("classifier", ("classifier",)),
    "vae": ("vae", ("vae",)),
    "decoder": ("vae", ("vae",)),
    "teacher": ("teacher", ("unet", "text_encoder")),
    "teacher_ft": ("teacher", ("unet", "text_encoder")),
    "student": ("student", ("unet",)),
    "ue_decoder": ("ue_decoder", ("decoder",)),
}


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stages_to_seed(config: DistillConfig, run: tuple[str, ...]) -> tuple[str, ...]:
    """The enabled stages before the first of ``run`` (all enabled stages when ``run`` is empty
    or every stage): what ``--init_from`` seeds for a ``--stage`` choice."""
    from meg_jax.distill.train import enabled_stages

    enabled = enabled_stages(config)
    first = min((STAGES.index(s) for s in run), default=len(STAGES))
    if set(run) >= set(enabled):
        first = len(STAGES)
    return tuple(s for s in enabled if STAGES.index(s) < first)


def _component_stage(meta: dict, chain: tuple[str, ...], stage: str, path: str) -> dict:
    """The ``{"steps", "seed", ...}`` record of ``stage`` in a component's ``stage`` entry.

    A component made by one stage stores that stage's record flat; one made by a chain
    (vae + decoder, teacher + teacher_ft) stores ``{stage: record}``. ``chain`` is the
    config's enabled stages that make this component.
    """
    record = meta.get("stage")
    if not isinstance(record, dict):
        raise ckpt.CorruptCheckpointError(f"{path} has no 'stage' record (steps, seed of the stages it went through)")
    if "steps" in record:  # one stage made it
        if chain == (stage,):
            return record
        raise ValueError(f"{path} records one stage (steps {record.get('steps')}, seed {record.get('seed')}); the "
                         f"config makes this component with the stages {list(chain)}: pass --{chain[-1]} None "
                         "to seed from it")
    if stage not in record:
        raise ValueError(f"{path} records the stages {sorted(record)}, not '{stage}', which the config enables; "
                         f"pass --{stage} None to seed from it")
    return record[stage]


def _check_source(source: str, config: DistillConfig, stages: tuple[str, ...]) -> dict[str, dict]:
    """Reads and checks the export against ``config``; returns component -> its config.json."""
    from meg_jax.distill.train import enabled_stages

    top = os.path.join(source, "backbone.json")
    if not os.path.exists(top):
        raise FileNotFoundError(f"--init_from {source}: {top} not found; expected an exported backbone folder "
                                f"(backbone.json and the folders {ckpt.COMPONENTS}) written by --export")
    meta = ckpt.read_json(top, "the backbone's settings", required=("backbone", "sampling", "data"))
    wanted = {"backbone": config_lib.to_dict(config.backbone), "sampling": config_lib.to_dict(config.sampling),
              "data": config_lib.to_dict(config.data)}
    stored = {k: dict(meta[k]) for k in wanted}
    for d in (stored["backbone"], wanted["backbone"]):
        d.pop("latent_scaling_factor", None)  # measured after the VAE stage, not configured
    differ = config_lib.diff(stored, json.loads(json.dumps(wanted)))
    if differ:
        raise ValueError(f"--init_from {source}: {top} was made with another config; differing fields "
                         f"(stored != requested): {'; '.join(differ)}")
    components: dict[str, dict] = {}
    enabled = enabled_stages(config)
    for stage in stages:
        name, parts = STAGE_COMPONENTS[stage]
        folder = os.path.join(source, name)
        path = os.path.join(folder, ckpt.CONFIG_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--init_from {source}: the '{stage}' stage needs the '{name}' component, "
                                    f"but {path} is missing")
        comp = components.setdefault(name, ckpt.read_json(path, f"the {name}'s settings", required=("config",)))
        for part in parts:
            file = os.path.join(folder, f"{part}.safetensors")
            if not os.path.exists(file):
                raise FileNotFoundError(f"--init_from {source}: the '{stage}' stage needs {file}, which is missing")
        chain = tuple(s for s in enabled if STAGE_COMPONENTS[s][0] == name)
        record = _component_stage(comp, chain, stage, path)
        cfg = getattr(config, stage)
        for field in ("steps", "seed"):
            if record.get(field) != getattr(cfg, field):
                raise ValueError(f"--init_from {source}: {path} records {stage} {field} = {record.get(field)}, "
                                 f"the config has --{stage}.{field} {getattr(cfg, field)}; pass the export's "
                                 "settings")
        if stage == "classifier":
            differ = config_lib.diff(comp["config"], json.loads(json.dumps(config_lib.to_dict(config.classifier_model))))
            if differ:
                raise ValueError(f"--init_from {source}: {path} holds another classifier_model; differing fields "
                                 f"(stored != requested): {'; '.join(differ)}")
        if stage == "vae" and comp.get("latent_scale") != meta["backbone"].get("latent_scaling_factor"):
            raise ckpt.CorruptCheckpointError(
                f"{path} records latent_scale {comp.get('latent_scale')}, {top} latent_scaling_factor "
                f"{meta['backbone'].get('latent_scaling_factor')}: they must be the measured scale, equal")
    return components


def seed_workdir(workdir: str, source: str, config: DistillConfig, stages: tuple[str, ...]) -> list[str]:
    """Writes ``stages`` of ``workdir`` as finished stages from the exported backbone ``source``.

    A stage already seeded from the same files is left as it is (rerunning a command is
    safe); one that holds anything else (a finished or started run) is refused.

    Args:
      workdir: the work directory (created).
      source: an exported backbone folder (``backbone.json`` and component folders).
      config: the job config the work directory is run with.
      stages: the stages to seed (see ``stages_to_seed``).

    Returns:
      The stages seeded by this call (not those already seeded).

    Raises:
      FileNotFoundError: ``source`` lacks ``backbone.json`` or a component file a stage needs
        (the message names it).
      ValueError: the export does not match ``config`` (names the file and the field), or a
        stage of ``workdir`` already holds other weights.
    """
    from meg_jax.distill.stage_io import _final_dir, mark_done, stage_done
    from meg_jax.distill.train import stage_record

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
    if config.pipeline is not None:
        raise ValueError("--init_from seeds the procedural stages from an exported backbone; it does not apply "
                         "with a pipeline teacher (--pipeline.*)")
    # an export made before the merging-aware decoder existed has no ue_decoder/: that optional
    # stage is then left to run (it trains from the seeded VAE) instead of refused
    stages = tuple(s for s in stages
                   if s != "ue_decoder" or os.path.exists(os.path.join(source, "ue_decoder", ckpt.CONFIG_FILE)))
    components = _check_source(source, config, stages)
    seeded = []
    for stage in stages:
        name, parts = STAGE_COMPONENTS[stage]
        files = {part: os.path.join(source, name, f"{part}.safetensors") for part in parts}
        hashes = {part: file_sha256(f) for part, f in files.items()}
        directory = os.path.join(workdir, stage)
        final = _final_dir(workdir, stage)
        marker = os.path.join(directory, "seeded.json")
        if stage_done(workdir, stage) or os.path.isdir(os.path.join(directory, "checkpoints")):
            previous = ckpt.read_json(marker, "where the stage was seeded from") if os.path.exists(marker) else {}
            if previous.get("sha256") == hashes:
                ckpt.check_config(directory, stage_record(stage, config))
                continue
            raise ValueError(f"--init_from {source}: {directory} already holds a {'finished' if stage_done(workdir, stage) else 'started'} "
                             f"'{stage}' stage with other weights; seed a new --workdir")
        ckpt.check_config(directory, stage_record(stage, config))
        os.makedirs(final, exist_ok=True)
        for part, file in files.items():
            shutil.copyfile(file, os.path.join(final, f"{part}.safetensors"))
        if stage == "vae":  # the latent space's scale, as the VAE stage's first reader caches it
            with open(os.path.join(directory, "latent_scale.json"), "w") as f:
                json.dump({"latent_scale": float(components["vae"]["latent_scale"])}, f)
        with open(marker, "w") as f:
            json.dump({"source": os.path.abspath(source), "component": name, "sha256": hashes,
                       "stage": components[name].get("stage")}, f, indent=2, sort_keys=True)
            f.write("\n")
        mark_done(workdir, stage, getattr(config, stage).steps)
        seeded.append(stage)
    return seeded
