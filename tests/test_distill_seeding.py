"""Tests of meg_jax.distill.seeding (a work directory seeded from an exported backbone), the
student's ``init_weights`` and its shape-weighted pixel term.

No stage trains here: a fake finished work directory is written from freshly initialised
parameters of the ``test`` preset and exported with ``train.export`` (seconds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.distill import config as dconfig
from meg_jax.distill import losses, objectives, seeding, stage_io, train


def _tree_files(folder: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = seeding.file_sha256(path)
    return out


@pytest.fixture(scope="module")
def config():
    return dconfig.preset("test")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, config):
    """An export of a fake finished work directory: random params for every stage (each stage
    its own key, so the teacher and the student differ, and so do teacher and teacher_ft)."""
    from meg_jax.backbone import init_text_encoder, init_unet, init_vae
    from meg_jax.data.classifier import init_classifier

    workdir = str(tmp_path_factory.mktemp("fake_run"))
    b = config.backbone
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 12))
    # The classifier's Module.init compiles for ~7 s: trace its shapes and fill them instead.
    shapes = jax.eval_shape(lambda k: init_classifier(config.classifier_model, k), next(keys))
    rng = np.random.default_rng(0)
    classifier = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), shapes)
    stage_io.save_final(workdir, "classifier", {"classifier": classifier})
    stage_io.save_final(workdir, "vae", {"vae": init_vae(b.vae, next(keys))})
    stage_io.save_final(workdir, "decoder", {"vae": init_vae(b.vae, next(keys))})
    for stage in ("teacher", "teacher_ft"):
        stage_io.save_final(workdir, stage, {"unet": init_unet(b.unet, next(keys)),
                                             "text_encoder": init_text_encoder(b.text_encoder, next(keys))})
    stage_io.save_final(workdir, "student", {"unet": init_unet(b.unet, next(keys))})
    stage_io.save_final(workdir, "ue_decoder", {"decoder": objectives.split_vae(init_vae(b.vae, next(keys)))[1]})
    stage_io.mark_done(workdir, "ue_decoder", 4)  # export writes a finished one only
    with open(os.path.join(workdir, "vae", "latent_scale.json"), "w") as f:
        json.dump({"latent_scale": 0.123456789}, f)  # as measured; seeding must carry it exactly
    out = str(tmp_path_factory.mktemp("export") / "backbone")
    train.export(workdir, out, config)
    return out


def test_seeded_workdir_exports_the_source_bit_for_bit(exported, config, tmp_path):
    workdir = str(tmp_path / "w")
    assert seeding.stages_to_seed(config, dconfig.STAGES) == dconfig.STAGES
    assert seeding.seed_workdir(workdir, exported, config, dconfig.STAGES) == list(dconfig.STAGES)
    for stage in dconfig.STAGES:
        assert os.path.exists(os.path.join(workdir, stage, "final", "DONE"))
        with open(os.path.join(workdir, stage, "config.json")) as f:  # the record run() checks
            assert json.load(f) == json.loads(json.dumps(train.stage_record(stage, config)))
    # Every stage is finished: run() trains nothing, and the export is the source, byte for byte.
    assert train.run(config, dconfig.STAGES, workdir, progress=False) == dict.fromkeys(dconfig.STAGES, True)
    again = str(tmp_path / "again")
    train.export(workdir, again, config)
    assert _tree_files(again) == _tree_files(exported)
    # Rerunning the same seeding is a no-op; a stage holding other weights is refused.
    assert seeding.seed_workdir(workdir, exported, config, dconfig.STAGES) == []
    other = str(tmp_path / "other")
    train.export(workdir, other, config)
    shutil.copyfile(os.path.join(other, "teacher", "unet.safetensors"), os.path.join(other, "student", "unet.safetensors"))
    with pytest.raises(ValueError, match=r"already holds a finished 'student' stage"):
        seeding.seed_workdir(workdir, other, config, ("student",))


def test_an_export_without_a_ue_decoder_leaves_that_stage_to_run(exported, config, tmp_path):
    older = str(tmp_path / "older")  # exported before the merging-aware decoder existed
    shutil.copytree(exported, older)
    shutil.rmtree(os.path.join(older, "ue_decoder"))
    workdir = str(tmp_path / "w")
    assert seeding.seed_workdir(workdir, older, config, dconfig.STAGES) == list(dconfig.STAGES[:-1])
    assert not os.path.exists(os.path.join(workdir, "ue_decoder"))


def test_stages_to_seed_are_those_before_the_stage_run(config):
    off = dataclasses.replace(config, teacher_ft=None)
    assert seeding.stages_to_seed(config, ("student",)) == dconfig.STAGES[:5]
    assert seeding.stages_to_seed(off, ("student",)) == ("classifier", "vae", "decoder", "teacher")
    assert seeding.stages_to_seed(config, ("teacher_ft",)) == ("classifier", "vae", "decoder", "teacher")
    assert seeding.stages_to_seed(config, ()) == dconfig.STAGES  # --stage none


def test_seeding_refuses_what_does_not_match(exported, config, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(exported, broken)
    os.remove(os.path.join(broken, "teacher", "text_encoder.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"teacher/text_encoder\.safetensors"):
        seeding.seed_workdir(str(tmp_path / "a"), broken, config, ("teacher",))
    shutil.rmtree(os.path.join(broken, "classifier"))
    with pytest.raises(FileNotFoundError, match=r"classifier/config\.json is missing"):
        seeding.seed_workdir(str(tmp_path / "a"), broken, config, ("classifier",))
    with pytest.raises(FileNotFoundError, match=r"nowhere/backbone\.json not found"):
        seeding.seed_workdir(str(tmp_path / "a"), str(tmp_path / "nowhere"), config, ("classifier",))
    longer = dataclasses.replace(config, teacher_ft=dataclasses.replace(config.teacher_ft, steps=5))
    with pytest.raises(ValueError, match=r"teacher_ft steps = 4, the config has --teacher_ft\.steps 5"):
        seeding.seed_workdir(str(tmp_path / "b"), exported, longer, ("teacher", "teacher_ft"))
    wider = dataclasses.replace(config, data=dataclasses.replace(config.data, jitter=0.3),
                                classifier_model=dataclasses.replace(config.classifier_model,
                                                                     data=dataclasses.replace(config.data, jitter=0.3)))
    with pytest.raises(ValueError, match=r"backbone\.json was made with another config.*data\.jitter"):
        seeding.seed_workdir(str(tmp_path / "c"), exported, wider, ("classifier",))
    # An export made without teacher_ft cannot seed a config that runs it, and says how.
    one = str(tmp_path / "one")
    shutil.copytree(exported, one)
    meta_path = os.path.join(one, "teacher", "config.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["stage"] = meta["stage"]["teacher"]  # what export writes when teacher_ft is off
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"pass --teacher_ft None"):
        seeding.seed_workdir(str(tmp_path / "d"), one, config, ("teacher",))
    off = dataclasses.replace(config, teacher_ft=None)
    assert seeding.seed_workdir(str(tmp_path / "e"), one, off, ("teacher",)) == ["teacher"]


def test_cli_init_from_names_the_missing_folder(tmp_path, capsys):
    from train import distill as cli

    assert cli.main(["--preset", "test", "--workdir", str(tmp_path / "w"), "--init_from", str(tmp_path / "none"),
                     "--stage", "student", "--no_progress"]) == 2
    assert "none/backbone.json not found" in capsys.readouterr().err


def test_student_continues_from_init_weights(exported, config, tmp_path):
    """``student.init_weights``: the student starts from the exported student, the start is
    recorded in init.json and the export's student record says what it continued from."""
    cont = dataclasses.replace(config, student=dataclasses.replace(config.student, init_weights=exported))
    workdir = str(tmp_path / "w")
    seeding.seed_workdir(workdir, exported, cont, dconfig.STAGES)
    teacher = train.load_final(workdir, "teacher_ft", ("unet",))["unet"]
    params = stage_io.student_init(workdir, cont, train.zero_step_conditioning(teacher))
    shipped = train.load_final(workdir, "student", ("unet",))["unet"]
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(shipped)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    out = str(tmp_path / "out")
    train.export(workdir, out, cont)
    with open(os.path.join(out, "student", "config.json")) as f:
        stage = json.load(f)["stage"]
    assert stage["continued_from"]["sha256"] == seeding.file_sha256(os.path.join(exported, "student", "unet.safetensors"))
    assert stage["continued_from"]["stage"] == {"seed": 0, "steps": 4}
    assert stage["config"]["init_weights"] == exported
    # A file of another architecture is refused, naming the file and a parameter.
    with pytest.raises(ValueError, match=r"classifier\.safetensors does not fit the student UNet"):
        bad = dataclasses.replace(config, student=dataclasses.replace(
            config.student, init_weights=os.path.join(exported, "classifier", "classifier.safetensors")))
        stage_io.student_init(str(tmp_path / "x"), bad, teacher)
    with pytest.raises(FileNotFoundError, match=r"nope/student/unet\.safetensors not found"):
        stage_io.student_init(str(tmp_path / "x"), dataclasses.replace(config, student=dataclasses.replace(
            config.student, init_weights=str(tmp_path / "nope"))), teacher)
    # The new fields stay out of the record at their defaults (older work directories resume).
    assert "init_weights" not in train.stage_record("student", config)["student"]
    assert train.stage_record("student", cont)["student"]["init_weights"] == exported


def test_shape_term_of_the_rollout_loss():
    """Hand case: a 4 x 4 white image with a 2 x 2 red square; the student's sample is off by
    0.5 on the square's pixels only, so the whole-image MSE is 0.25 x 4/16 and the shape MSE,
    over the (undilated) mask, is 0.25."""
    palette = jnp.asarray([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0]])
    target = jnp.ones((1, 4, 4, 3)).at[:, 1:3, 1:3].set(jnp.asarray([1.0, -1.0, -1.0]))
    background = losses.border_background(target, palette)
    np.testing.assert_array_equal(np.asarray(background), [[1.0, 1.0, 1.0]])
    mask = losses.foreground_mask(target, background, 1, threshold=0.5)
    assert float(mask.sum()) == 4.0
    out = target + 0.5 * mask
    loss, m = losses.rollout_loss(lambda k: out, target, jnp.int32(0), (1,), lambda z: z, target, 1.0, mask, 2.0)
    assert float(m["pixel_mse"]) == pytest.approx(0.25 * 4 / 16)
    assert float(m["shape_mse"]) == pytest.approx(0.25)
    assert float(loss) == pytest.approx(float(m["latent_mse"]) + 0.25 * 4 / 16 + 2.0 * 0.25)
    with pytest.raises(ValueError, match="mask_dilation"):
        dconfig.StudentStageConfig(mask_dilation=2)
