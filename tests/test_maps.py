"""Brain maps in each dataset's own space: written through RunDir in the space the run's datamodule class gives,
read back with nibabel (independently of our reader) at the run's voxels, exactly; pictures through nilearn,
offline, on small volumes and meshes written in the real formats."""
import logging

import nibabel as nib
import numpy as np
import pytest
import yaml
from nibabel.cifti2 import cifti2_axes

from analyses.jobs import maps_figures
from analyses.jobs.maps import (MapsOptions, clip_msm_maps, wen2018_maps, write_job_maps, write_run_maps,
                                write_training_maps)
from analyses.jobs.maps_figures import MapStyle, plot_map, style_for
from datamodules.nsd_files import NSDPaths
from datamodules.video_files import VideoPaths, write_dtseries
from encoders.run_dir import RunDir
from tests.nsd_layout import SHAPE, voxel_to_vertex, write_minimal_nsd, write_space

SPLITS = ("val", "test")


def fake_run(path, data: dict, description: dict, voxel_xyz: np.ndarray, rois: dict | None = None, seed: int = 0):
    """A finished run's directory as train.py writes it (config, run.json, voxel_metrics.npz, metrics.json),
    with random per-voxel scores at ``voxel_xyz``."""
    rng = np.random.default_rng(seed)
    n = len(voxel_xyz)
    run = RunDir(path)
    run.write_config(yaml.safe_dump({"data": data}))
    per_split = {s: {"r": rng.uniform(-0.2, 0.9, n), "r2": rng.uniform(-0.3, 0.8, n), "nc": rng.uniform(10, 90, n),
                     "nc_r2": rng.normal(0.3, 0.3, n)} for s in SPLITS}
    per_split["test"]["r"][0] = np.nan  # a voxel whose score could not be computed stays NaN in its map
    run.write_voxel_metrics(per_split, voxel_xyz, rois or {"all": np.ones(n, bool)})
    run.write_info({"backbone": "tiny", "layers": ["embed"], "head": "ridge", "data": description})
    run.write_metrics({"test": {"r_mean": 0.1, "rois": {}}})
    return run


@pytest.fixture(scope="module")
def nsd(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsd")
    truth = write_minimal_nsd(root)
    for space in ("func1mm", "nativesurface", "fsaverage"):
        write_space(root, 1, space)
    return root, truth


def nsd_run(tmp_path, root, space: str, xyz: np.ndarray, name: str = "run"):
    target = "datamodules.synthetic_datamodule.SyntheticDataModule" if space == "synthetic" else "datamodules.nsd.NSDDataModule"
    space = "func1pt8mm" if space == "synthetic" else space
    data = {"_target_": target, "root": str(root), "subject": 1, "space": space, "roi_mask": "nsdgeneral"}
    return fake_run(tmp_path / name, data, {"dataset": "nsd", "subject": 1, "space": space}, xyz)


def written(run: RunDir, name: str = "test_r") -> np.ndarray:
    return run.voxels()[name].astype(np.float32)


@pytest.mark.parametrize("space", ["func1pt8mm", "func1mm"])
def test_volume_maps_read_back_exactly_on_the_subjects_grid(nsd, tmp_path, space):
    root, truth = nsd
    run = nsd_run(tmp_path, root, space, truth["xyz"])
    files = run.write_maps({"test_r": run.voxels().values("test", "r")})
    assert files == [run.maps_dir / "test_r.nii.gz"]
    img = nib.load(files[0])
    roi = nib.load(NSDPaths(root, 1, space).roi("nsdgeneral"))
    data = np.asarray(img.dataobj)
    assert img.shape == SHAPE and data.dtype == np.float32
    np.testing.assert_array_equal(img.affine, roi.affine)
    assert img.header.get_zooms() == roi.header.get_zooms()
    assert (img.header.get_qform(coded=True)[1], img.header.get_sform(coded=True)[1]) == \
        (roi.header.get_qform(coded=True)[1], roi.header.get_sform(coded=True)[1])
    x, y, z = truth["xyz"].T
    np.testing.assert_array_equal(data[x, y, z], written(run))  # NaN where the score is NaN, exact elsewhere
    outside = np.ones(SHAPE, bool)
    outside[x, y, z] = False
    assert np.isnan(data[outside]).all()
    np.testing.assert_array_equal(run.read_map("test_r"), written(run))


@pytest.mark.parametrize("space", ["nativesurface", "fsaverage"])
def test_surface_maps_cover_every_vertex_and_read_back_exactly(nsd, tmp_path, space):
    root, truth = nsd
    verts = voxel_to_vertex(truth["xyz"], SHAPE)
    run = nsd_run(tmp_path, root, space, verts)
    files = run.write_maps({"test_r": run.voxels().values("test", "r")})
    assert [f.name for f in files] == ["lh.test_r.mgh", "rh.test_r.mgh"]
    paths = NSDPaths(root, 1, space)
    values = written(run)
    for h, (path, roi_path) in enumerate(zip(files, paths.roi_files("nsdgeneral"))):
        img, roi = nib.load(path), nib.load(roi_path)
        data = np.asarray(img.dataobj)
        assert isinstance(img, nib.MGHImage) and data.shape == roi.shape and (data.dtype.kind, data.dtype.itemsize) == ("f", 4)
        np.testing.assert_array_equal(img.affine, roi.affine)
        mine = verts[:, 0] == h
        np.testing.assert_array_equal(data.reshape(-1)[verts[mine, 1]], values[mine])
        assert np.isnan(np.delete(data.reshape(-1), verts[mine, 1])).all()
    np.testing.assert_array_equal(run.read_map("test_r"), values)


def cifti_axis(n_left: int, n_right: int, n_vertices: int, rng) -> cifti2_axes.BrainModelAxis:
    return cifti2_axes.BrainModelAxis.from_surface(np.sort(rng.choice(n_vertices, n_left, replace=False)), n_vertices,
                                                   "CortexLeft") + \
        cifti2_axes.BrainModelAxis.from_surface(np.sort(rng.choice(n_vertices, n_right, replace=False)), n_vertices,
                                                "CortexRight")


@pytest.fixture
def cifti_runs(tmp_path):
    """A NOD beta file (dscalar: cortex + a subcortical structure) and a video run (dtseries), written in the real
    formats, and a run of each with every other cortical grayordinate as its voxels."""
    rng = np.random.default_rng(0)
    n_vertices, n_left, n_right = 40, 30, 32
    n_cortex = n_left + n_right
    axis = cifti_axis(n_left, n_right, n_vertices, rng)
    mask = np.zeros((2, 2, 2), bool)
    mask[0] = True
    axis_full = axis + cifti2_axes.BrainModelAxis.from_mask(mask, name="ThalamusLeft", affine=np.eye(4))
    run_name = "ses-imagenet01_task-imagenet_run-1"
    beta = tmp_path / "nod/derivatives/ciftify/sub-01/results" / run_name / f"{run_name}_beta.dscalar.nii"
    beta.parent.mkdir(parents=True)
    nib.Cifti2Image(rng.normal(size=(5, len(axis_full))).astype(np.float32),
                    header=(cifti2_axes.ScalarAxis([f"t{i}" for i in range(5)]), axis_full)).to_filename(beta)
    video = VideoPaths(tmp_path / "wen", 1).cifti("seg1", 1)
    write_dtseries(video, rng.normal(size=(6, len(axis_full))), 2.0,
                   [(n, np.asarray(axis.vertex[axis.name == s]), n_vertices)
                    for n, s in (("CortexLeft", "CIFTI_STRUCTURE_CORTEX_LEFT"),
                                 ("CortexRight", "CIFTI_STRUCTURE_CORTEX_RIGHT"))], mask)
    grays = np.arange(0, n_cortex, 2)
    nod = fake_run(tmp_path / "nod_run", {"_target_": "datamodules.nod.NODDataModule", "root": str(tmp_path / "nod"),
                                          "subject": 1, "n_cortex": n_cortex},
                   {"dataset": "nod", "subject": 1, "runs": [run_name], "n_cortex": n_cortex}, grays[:, None])
    hemi = (grays >= n_left).astype(int)
    vid = fake_run(tmp_path / "video_run", {"_target_": "datamodules.video.VideoDataModule", "root": str(tmp_path / "wen"),
                                            "subject": 1, "n_cortex": n_cortex},
                   {"dataset": "video", "subject": 1, "stimuli": ["seg1", "test1"], "n_cortex": n_cortex},
                   np.stack([grays, hemi, np.asarray(axis.vertex)[grays]], 1))
    return {"nod": (nod, beta), "video": (vid, video), "axis": axis_full, "grays": grays, "n_vertices": n_vertices}


@pytest.mark.parametrize("kind", ["nod", "video"])
def test_cifti_maps_keep_the_input_brain_models_and_read_back_exactly(cifti_runs, kind):
    run, source = cifti_runs[kind]
    files = run.write_maps({"test_r": run.voxels().values("test", "r")})
    assert files == [run.maps_dir / "test_r.dscalar.nii"]
    img = nib.load(files[0])
    assert isinstance(img, nib.Cifti2Image)
    assert img.header.get_axis(1) == nib.load(source).header.get_axis(1) == cifti_runs["axis"]
    assert list(img.header.get_axis(0).name) == ["test_r"]
    row = np.asarray(img.dataobj)[0]
    cortex = np.flatnonzero(np.isin(cifti_runs["axis"].name, ["CIFTI_STRUCTURE_CORTEX_LEFT",
                                                              "CIFTI_STRUCTURE_CORTEX_RIGHT"]))
    np.testing.assert_array_equal(row[cortex[cifti_runs["grays"]]], written(run))
    others = np.setdiff1d(np.arange(len(row)), cortex[cifti_runs["grays"]])
    assert np.isnan(row[others]).all()  # the other cortical grayordinates and the subcortical voxels
    np.testing.assert_array_equal(run.read_map("test_r"), written(run))


def test_a_missing_space_file_is_one_line_naming_it(nsd, tmp_path):
    root, truth = nsd
    run = nsd_run(tmp_path, tmp_path / "moved", "func1pt8mm", truth["xyz"])
    with pytest.raises(ValueError, match=r"moved/nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz: not found"):
        run.brain_space()
    with pytest.raises(ValueError, match="map name"):
        nsd_run(tmp_path, root, "func1pt8mm", truth["xyz"], "ok").write_maps({"../x": np.zeros(len(truth["xyz"]))})


def test_training_maps_failure_is_a_warning_and_the_options_are_checked(nsd, tmp_path, caplog):
    root, truth = nsd
    run = nsd_run(tmp_path, tmp_path / "moved", "func1pt8mm", truth["xyz"])
    with caplog.at_level(logging.WARNING):
        assert write_training_maps(run, {"enabled": True}) == []
    assert "analysis=maps run_dir=" in caplog.text and "nsdgeneral.nii.gz" in caplog.text
    assert write_training_maps(run, {"enabled": False}) == []
    with pytest.raises(ValueError, match="analysis.metrics"):
        MapsOptions(metrics=["accuracy"]).check()
    with pytest.raises(ValueError, match="analysis.surfaces"):
        MapsOptions(surfaces={"lh": "x"}).check()


class Spy:
    """Records the keyword arguments of every call of a nilearn plotting function, then calls it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append({**kwargs, "args": args})
        return self.fn(*args, **kwargs)


def png_pixels(path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_volume_picture_is_a_mosaic_over_the_subjects_t1_when_present(nsd, tmp_path, monkeypatch):
    from nilearn import plotting
    root, truth = nsd
    run = nsd_run(tmp_path, root, "func1pt8mm", truth["xyz"])
    spy = Spy(plotting.plot_stat_map)
    monkeypatch.setattr(plotting, "plot_stat_map", spy)
    files = write_run_maps(run, MapsOptions(metrics=["nc_r2"]))
    assert [f.name for f in files] == ["test_nc_r2.nii.gz", "test_nc_r2.png"]
    assert spy.calls[-1]["bg_img"] is None and spy.calls[-1]["display_mode"] == "mosaic"
    t1 = NSDPaths(root, 1).anatomy()["T1"]
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(size=SHAPE).astype(np.float32),
                             nib.load(NSDPaths(root, 1).roi("nsdgeneral")).affine), t1)
    try:
        write_run_maps(run, MapsOptions(metrics=["nc_r2"]))
    finally:
        t1.unlink()
    assert spy.calls[-1]["bg_img"] == str(t1)
    pixels = png_pixels(run.maps_dir / "test_nc_r2.png")
    assert pixels.shape[0] > 200 and pixels.std() > 10  # a drawn figure, not a blank canvas


def write_mesh(path, n_vertices: int, rng) -> None:
    """A small closed-ish triangle mesh with n_vertices vertices, as FreeSurfer geometry (or GIFTI by suffix)."""
    coords = rng.normal(size=(n_vertices, 3)).astype(np.float32) * 20
    faces = np.array([[i, (i + 1) % n_vertices, (i + 2) % n_vertices] for i in range(n_vertices)], dtype=np.int32)
    if str(path).endswith(".gii"):
        nib.save(nib.gifti.GiftiImage(darrays=[
            nib.gifti.GiftiDataArray(coords, intent="NIFTI_INTENT_POINTSET", datatype="NIFTI_TYPE_FLOAT32"),
            nib.gifti.GiftiDataArray(faces, intent="NIFTI_INTENT_TRIANGLE", datatype="NIFTI_TYPE_INT32")]), path)
    else:
        nib.freesurfer.write_geometry(str(path), coords, faces)


def test_fsaverage_picture_uses_the_inflated_surfaces_nsd_ships(nsd, tmp_path, monkeypatch):
    from nilearn import plotting
    root, truth = nsd
    run = nsd_run(tmp_path, root, "fsaverage", voxel_to_vertex(truth["xyz"], SHAPE))
    space = run.brain_space()
    spy = Spy(plotting.plot_surf_stat_map)
    monkeypatch.setattr(plotting, "plot_surf_stat_map", spy)
    write_run_maps(run, MapsOptions(metrics=["r"]))  # no surf/ folder: the documented fallback
    assert not spy.calls
    rng = np.random.default_rng(0)
    meshes = NSDPaths(root, 1, "fsaverage").meshes()
    for hemi, n in zip(("left", "right"), space.n_vertices):
        meshes[hemi]["inflated"].parent.mkdir(parents=True, exist_ok=True)
        write_mesh(meshes[hemi]["inflated"], n, rng)
        nib.freesurfer.write_morph_data(str(meshes[hemi]["sulc"]), rng.normal(size=n).astype(np.float32))
    files = write_run_maps(run, MapsOptions(metrics=["r"]))
    assert [f.name for f in files] == ["lh.test_r.mgh", "rh.test_r.mgh", "test_r.png"]
    assert [(c["hemi"], c["view"]) for c in spy.calls] == [("left", "lateral"), ("left", "ventral"),
                                                           ("right", "lateral"), ("right", "ventral")]
    assert all(c["bg_map"] is not None for c in spy.calls)
    assert png_pixels(files[-1]).std() > 10


def test_cifti_pictures_on_user_surfaces_else_the_documented_fallback(cifti_runs, tmp_path, monkeypatch):
    from nilearn import plotting
    run, _ = cifti_runs["nod"]
    spy = Spy(plotting.plot_surf_stat_map)
    monkeypatch.setattr(plotting, "plot_surf_stat_map", spy)
    fallback = write_run_maps(run, MapsOptions(metrics=["nc_r2"]))[-1]
    assert not spy.calls and png_pixels(fallback).std() > 10
    rng = np.random.default_rng(1)
    surfaces = {h: tmp_path / f"{h}.inflated.surf.gii" for h in ("left", "right")}
    for path in surfaces.values():
        write_mesh(path, cifti_runs["n_vertices"], rng)
    write_run_maps(run, MapsOptions(metrics=["nc_r2"], surfaces={h: str(p) for h, p in surfaces.items()}))
    assert [(c["hemi"], c["view"]) for c in spy.calls] == [("left", "lateral"), ("left", "ventral"),
                                                           ("right", "lateral"), ("right", "ventral")]
    # what is drawn on a hemisphere: the map at the vertices the file's brain models name, NaN elsewhere
    axis, values = cifti_runs["axis"], written(run).astype(np.float64)
    for call in spy.calls:
        structure = f"CIFTI_STRUCTURE_CORTEX_{call['hemi'].upper()}"
        expected = np.full(cifti_runs["n_vertices"], np.nan)
        cortex = np.flatnonzero(np.isin(axis.name, ["CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT"]))
        columns = cortex[cifti_runs["grays"]]
        mine = axis.name[columns] == structure
        expected[axis.vertex[columns[mine]]] = run.voxels()["test_nc_r2"].astype(np.float32)[mine]
        np.testing.assert_array_equal(call["args"][1], expected)
    write_mesh(surfaces["left"], cifti_runs["n_vertices"] + 1, rng)
    with pytest.raises(ValueError, match=r"left.inflated.surf.gii: 41 vertices, but the run's left hemisphere has 40"):
        write_run_maps(run, MapsOptions(metrics=["nc_r2"], surfaces={h: str(p) for h, p in surfaces.items()}))
    assert values.size


def test_analysis_maps_are_categorical_or_continuous_and_read_back(nsd, tmp_path):
    root, truth = nsd
    run = nsd_run(tmp_path, root, "func1pt8mm", truth["xyz"])
    n = len(truth["xyz"])
    rng = np.random.default_rng(0)
    best = rng.integers(-1, 3, n)
    p_fdr = rng.uniform(0, 1, n)
    maps, styles = wen2018_maps({"p_fdr": p_fdr, "best_layer": best}, ["conv3", "conv4", "conv5"], 0.01)
    S = rng.dirichlet(np.ones(4), n).T
    labels = S.argmax(0)
    more, more_styles = clip_msm_maps(S, labels, ["faces", "bodies", "places", "words"])
    files, notes = write_job_maps(run, {**maps, **more}, {**styles, **more_styles})
    assert not notes and {f.name for f in files} >= {"wen2018_q.nii.gz", "wen2018_best_layer.png",
                                                       "clip_msm_top_concept.nii.gz", "clip_msm_top_share.png"}
    np.testing.assert_array_equal(run.read_map("wen2018_best_layer"), np.where(best >= 0, best, np.nan))
    np.testing.assert_array_equal(run.read_map("wen2018_q"), p_fdr.astype(np.float32))
    np.testing.assert_array_equal(run.read_map("clip_msm_top_concept"), labels)
    np.testing.assert_allclose(run.read_map("clip_msm_top_share"), S.max(0), rtol=1e-6)
    assert styles["wen2018_best_layer"].categories == ("conv3", "conv4", "conv5") and styles["wen2018_q"].neg_log10
    moved = nsd_run(tmp_path, tmp_path / "moved", "func1pt8mm", truth["xyz"], "moved_run")
    files, notes = write_job_maps(moved, maps, styles)
    assert files == [] and "brain maps not written" in notes[0]


def test_styles_by_name():
    assert style_for("test_nc_r2").label.startswith("NC-R²") and style_for("val_r").label == "Pearson r"
    assert style_for("test_nc").symmetric is False and style_for("diff_test_r").label == "difference of Pearson r"
    lo, hi = maps_figures._limits(np.array([-0.1, 0.5, np.nan]), MapStyle("x"))
    assert lo == -hi and hi == pytest.approx(np.percentile([0.1, 0.5], 99))
