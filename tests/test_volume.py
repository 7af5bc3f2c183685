"""Loading CT series: sorting, Enhanced CT multi-frame, transfer syntaxes, skip reasons."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from qgate.score.volume import SeriesLoadError, find_series, load_series
from qgate.synth import make_ct_series, write_series


def _expected_hu(ds: Dataset) -> np.ndarray:
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
    return stored.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_single_frame_series_sorted_by_position(tmp_path: Path) -> None:
    datasets = make_ct_series(n_slices=5, rows=32, cols=32, noise_hu=10, seed=1)
    paths = write_series(datasets, tmp_path)
    random.Random(0).shuffle(paths)

    loaded = load_series(paths)
    vol = loaded.volume

    assert vol.hu.shape == (5, 32, 32) and vol.hu.dtype == np.float32
    # synth puts slice i at z = -2.5 i; ascending along the normal (0, 0, 1) reverses it.
    assert vol.slice_positions == (-10.0, -7.5, -5.0, -2.5, 0.0)
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for k, uid in enumerate(vol.sop_instance_uids):
        np.testing.assert_array_equal(vol.hu[k], _expected_hu(by_uid[uid]))
    assert [by_uid[u].InstanceNumber for u in vol.sop_instance_uids] == [5, 4, 3, 2, 1]
    assert vol.frame_numbers == (1,) * 5
    assert vol.pixel_spacing == (0.8, 0.8) and vol.slice_thickness == 2.5
    assert vol.series_instance_uid == datasets[0].SeriesInstanceUID
    assert vol.study_instance_uid == datasets[0].StudyInstanceUID
    assert vol.acquisition["kvp"] == 120 and vol.acquisition["convolution_kernel"] == "STANDARD"
    assert loaded.skipped == []
    assert len(loaded.headers) == 5 and all("PixelData" not in h for h in loaded.headers)
    assert [h.SOPInstanceUID for h in loaded.headers] == list(vol.sop_instance_uids)


def test_oblique_sort_uses_slice_normal(tmp_path: Path) -> None:
    # Sagittal slices: row direction +y, column direction -z, normal = -x.
    datasets = make_ct_series(n_slices=4, rows=16, cols=16, seed=2)
    for ds, x in zip(datasets, [3.0, -1.0, 7.0, 1.0], strict=True):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [x, 0, 0]
    paths = write_series(datasets, tmp_path)

    vol = load_series(paths).volume

    assert vol.slice_positions == (-7.0, -3.0, -1.0, 1.0)
    xs = {ds.SOPInstanceUID: ds.ImagePositionPatient[0] for ds in datasets}
    assert [xs[u] for u in vol.sop_instance_uids] == [7.0, 3.0, 1.0, -1.0]


def test_falls_back_to_instance_number(tmp_path: Path) -> None:
    datasets = make_ct_series(n_slices=4, rows=16, cols=16, seed=3)
    for ds, number in zip(datasets, [3, 1, 4, 2], strict=True):
        del ds.ImagePositionPatient
        del ds.SliceLocation
        ds.InstanceNumber = number
    vol = load_series(write_series(datasets, tmp_path)).volume
    numbers = {ds.SOPInstanceUID: ds.InstanceNumber for ds in datasets}
    assert [numbers[u] for u in vol.sop_instance_uids] == [1, 2, 3, 4]
    assert vol.slice_positions == (0.0, 2.5, 5.0, 7.5)  # index * slice thickness


def _enhanced_ct(rows: int = 8, cols: int = 8) -> tuple[Dataset, np.ndarray]:
    """A 3-frame Enhanced CT instance with frames stored out of order."""
    rng = np.random.default_rng(0)
    stored = rng.integers(900, 1200, size=(3, rows, cols), dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, 3
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0

    def item(**kw: object) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    shared = item(
        PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.5, 0.6], SliceThickness=1.0)]),
        PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
        PixelValueTransformationSequence=Sequence(
            [item(RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU")]
        ),
        CTReconstructionSequence=Sequence([item(ConvolutionKernel="B30f")]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for z in (5.0, 0.0, 10.0):
        frames.append(item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[0, 0, z])])))
    # Frame 3 overrides the shared rescale.
    frames[2].PixelValueTransformationSequence = Sequence(
        [item(RescaleIntercept=-1000, RescaleSlope=2, RescaleType="HU")]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = stored.tobytes()
    return ds, stored


def test_enhanced_ct_multiframe(tmp_path: Path) -> None:
    ds, stored = _enhanced_ct()
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)

    loaded = load_series([path])
    vol = loaded.volume

    assert vol.hu.shape == (3, 8, 8)
    assert vol.slice_positions == (0.0, 5.0, 10.0)
    assert vol.frame_numbers == (2, 1, 3)
    assert vol.sop_instance_uids == (ds.SOPInstanceUID,) * 3
    np.testing.assert_array_equal(vol.hu[0], stored[1].astype(np.float32) - 1024)
    np.testing.assert_array_equal(vol.hu[1], stored[0].astype(np.float32) - 1024)
    np.testing.assert_array_equal(vol.hu[2], stored[2].astype(np.float32) * 2 - 1000)
    assert vol.pixel_spacing == (0.5, 0.6) and vol.slice_thickness == 1.0
    assert vol.sop_class_uid == EnhancedCTImageStorage
    assert vol.acquisition["convolution_kernel"] == "B30f"
    assert len(loaded.headers) == 1


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEG2000Lossless,
        JPEGLSLossless,
    ],
)
def test_transfer_syntaxes(tmp_path: Path, syntax: UID) -> None:
    datasets = make_ct_series(n_slices=2, rows=32, cols=32, seed=4)
    expected = [_expected_hu(ds) for ds in reversed(datasets)]
    for ds in datasets:
        if syntax.is_compressed:
            ds.compress(syntax)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
    vol = load_series(write_series(datasets, tmp_path)).volume
    for k in range(2):
        np.testing.assert_array_equal(vol.hu[k], expected[k])


def test_skip_reasons(tmp_path: Path) -> None:
    datasets = make_ct_series(n_slices=8, rows=32, cols=32, seed=5)
    datasets[1].PixelData = datasets[1].PixelData[:-100]  # truncated native pixel data
    datasets[2].compress(RLELossless)
    data = bytearray(datasets[2].PixelData)
    data[20:40] = b"\xff" * 20  # corrupt RLE header / segments
    datasets[2].PixelData = bytes(data)
    del datasets[3].PixelData
    datasets[4].Modality = "MR"
    other = make_ct_series(n_slices=1, rows=16, cols=16, seed=6)[0]
    other.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    datasets[5] = other  # a different image size
    paths = write_series(datasets, tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not dicom")
    dup = tmp_path / "dup.dcm"
    dup.write_bytes(paths[0].read_bytes())

    loaded = load_series([*paths, text, dup])

    reasons = {p.name: r for p, r in loaded.skipped}
    assert reasons["0001.dcm"].startswith("pixel data could not be decoded")
    assert reasons["0002.dcm"].startswith("pixel data could not be decoded (RLE Lossless)")
    assert reasons["0003.dcm"] == "no pixel data"
    assert reasons["0004.dcm"] == "modality 'MR' is not CT"
    assert "differs from the series majority 32x32" in reasons["0005.dcm"]
    assert reasons["notes.txt"].startswith("not a readable DICOM file")
    assert reasons["dup.dcm"] == "duplicate SOP Instance UID"
    assert len(loaded.skipped) == 7
    # Reasons carry no patient data.
    for reason in reasons.values():
        assert "Phantom" not in reason and "QGATE-TEST" not in reason
    vol = loaded.volume
    assert vol.n_slices == 3
    kept = {datasets[i].SOPInstanceUID for i in (0, 6, 7)}
    assert set(vol.sop_instance_uids) == kept
    assert list(vol.slice_positions) == sorted(vol.slice_positions)
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for k, uid in enumerate(vol.sop_instance_uids):  # compaction kept slices intact
        np.testing.assert_array_equal(vol.hu[k], _expected_hu(by_uid[uid]))


def test_nothing_usable_raises(tmp_path: Path) -> None:
    datasets = make_ct_series(n_slices=2, rows=16, cols=16, modality="MR")
    with pytest.raises(SeriesLoadError) as info:
        load_series(write_series(datasets, tmp_path))
    assert len(info.value.skipped) == 2
    with pytest.raises(SeriesLoadError):
        load_series([])


def test_refuses_absurd_volume(tmp_path: Path) -> None:
    paths = write_series(make_ct_series(n_slices=2, rows=16, cols=16), tmp_path)
    with pytest.raises(SeriesLoadError, match="too large"):
        load_series(paths, max_voxels=100)


def test_find_series(tmp_path: Path) -> None:
    a = make_ct_series(n_slices=3, rows=16, cols=16, seed=7)
    b = make_ct_series(n_slices=2, rows=16, cols=16, seed=8)
    write_series(a, tmp_path / "a")
    write_series(b, tmp_path / "nested" / "b")
    (tmp_path / "README.txt").write_text("hello")
    (tmp_path / "nested" / "junk.bin").write_bytes(b"\x00" * 300)

    found = find_series(tmp_path)

    assert set(found) == {a[0].SeriesInstanceUID, b[0].SeriesInstanceUID}
    assert len(found[a[0].SeriesInstanceUID]) == 3
    assert len(found[b[0].SeriesInstanceUID]) == 2
    assert load_series(found[b[0].SeriesInstanceUID]).volume.n_slices == 2
