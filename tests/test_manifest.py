"""Tests for manifest.py: the CSV contract (read, validate, write)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from liverlesion.errors import UserError
from liverlesion.manifest import COLUMNS, read_manifest, write_manifest

HEADER = "patient_id,image,mask,label,lesion_class,x_mm,y_mm,z_mm,diameter_mm"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A study folder with placeholder image/mask files (the manifest only checks they exist)."""
    (tmp_path / "img").mkdir()
    for name in (
        "img/p1.nii.gz",
        "img/p1_mask.nii.gz",
        "img/p1_cysts.nii.gz",
        "img/p2.nii.gz",
        "img/p2_mask.nii.gz",
    ):
        (tmp_path / name).write_bytes(b"placeholder")
    (tmp_path / "img" / "dicom_p3").mkdir()  # a DICOM folder is a valid image
    return tmp_path


def write(folder: Path, text: str, name: str = "manifest.csv", encoding: str = "utf-8") -> Path:
    path = folder / name
    path.write_bytes(text.encode(encoding))
    return path


def good_text() -> str:
    return "\n".join(
        [
            HEADER,
            "p1,img/p1.nii.gz,img/p1_mask.nii.gz,,metastasis,,,,",
            "p1,img/p1.nii.gz,img/p1_cysts.nii.gz,2,cyst,,,,",
            "p2,img/p2.nii.gz,,,cyst,10.5,-20,300.25,12",
            "p3,img/dicom_p3,,,metastasis,1,2,3,4.5",
        ]
    )


def test_read_good_manifest_types_and_paths(folder: Path):
    path = write(folder, good_text())
    df = read_manifest(path)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert {"image_path", "mask_path", "row"} <= set(df.columns)
    assert df["row"].tolist() == [1, 2, 3, 4]
    assert df["patient_id"].tolist() == ["p1", "p1", "p2", "p3"]
    # original strings kept, resolved absolute paths added
    assert df.loc[0, "image"] == "img/p1.nii.gz"
    assert df.loc[0, "image_path"] == str((folder / "img/p1.nii.gz").resolve())
    assert df.loc[1, "mask_path"] == str((folder / "img/p1_cysts.nii.gz").resolve())
    assert df.loc[2, "mask"] == "" and df.loc[2, "mask_path"] is None
    assert str(df["label"].dtype) == "Int64"
    assert pd.isna(df.loc[0, "label"]) and df.loc[1, "label"] == 2
    assert df.loc[2, ["x_mm", "y_mm", "z_mm", "diameter_mm"]].tolist() == [10.5, -20.0, 300.25, 12.0]
    assert math.isnan(df.loc[0, "x_mm"])
    assert df["series"].tolist() == ["", "", "", ""]


def test_bom_whitespace_case_and_blank_lines(folder: Path):
    text = (
        "\ufeff Patient_ID , image ,MASK, lesion_class ,series\n"
        "  007 , img/p1.nii.gz , img/p1_mask.nii.gz , metastasis , 1.2.3 \n"
        "\n"
    )
    df = read_manifest(write(folder, text))
    assert len(df) == 1
    # patient IDs stay text (leading zeros kept), values trimmed
    assert df.loc[0, "patient_id"] == "007"
    assert df.loc[0, "lesion_class"] == "metastasis"
    assert df.loc[0, "series"] == "1.2.3"
    assert Path(df.loc[0, "mask_path"]).is_file()


def test_absolute_paths_accepted(folder: Path, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("manifests")
    image = (folder / "img/p1.nii.gz").resolve()
    path = write(
        elsewhere, f"patient_id,image,mask,lesion_class\np1,{image},{folder / 'img/p1_mask.nii.gz'},cyst\n"
    )
    df = read_manifest(path)
    assert df.loc[0, "image_path"] == str(image)


def test_click_only_manifest(folder: Path):
    path = write(
        folder, "patient_id,image,lesion_class,x_mm,y_mm,z_mm,diameter_mm\np2,img/p2.nii.gz,cyst,1,2,3,4\n"
    )
    df = read_manifest(path)
    assert df.loc[0, "mask_path"] is None and df.loc[0, "diameter_mm"] == 4.0
    assert pd.isna(df.loc[0, "label"])


def read_error(path: Path) -> str:
    """The message of the UserError that reading ``path`` raises, checked to be one line naming the file."""
    with pytest.raises(UserError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def row_error(folder: Path, row_text: str, header: str = HEADER) -> str:
    return read_error(write(folder, f"{header}\np1,img/p1.nii.gz,img/p1_mask.nii.gz,,cyst,,,,\n{row_text}\n"))


@pytest.mark.parametrize(
    "row_text, expected",
    [
        (",img/p1.nii.gz,img/p1_mask.nii.gz,,cyst,,,,", "patient_id is empty"),
        ("p1,img/p1.nii.gz,img/p1_mask.nii.gz,,,,,,", "lesion_class is empty"),
        ("p1,,img/p1_mask.nii.gz,,cyst,,,,", "image is empty"),
        ("p1,img/p1.nii.gz,img/p1_mask.nii.gz,abc,cyst,,,,", "label='abc' is not an integer"),
        ("p1,img/p1.nii.gz,img/p1_mask.nii.gz,1.5,cyst,,,,", "label='1.5' is not an integer"),
        ("p1,img/p1.nii.gz,img/p1_mask.nii.gz,-1,cyst,,,,", "label='-1' is negative"),
        ("p1,img/p1.nii.gz,,3,cyst,1,2,3,4", "label='3' without a mask"),
        ("p1,img/p1.nii.gz,img/p2_mask.nii.gz,,cyst,1,2,3,4", "both mask='img/p2_mask.nii.gz' and a click"),
        ("p1,img/p1.nii.gz,,,cyst,,,,", "no lesion source"),
        ("p1,img/p1.nii.gz,,,cyst,abc,2,3,4", "x_mm='abc' is not a number"),
        ("p1,img/p1.nii.gz,,,cyst,1,nan,3,4", "y_mm='nan' is not a finite number"),
        ("p1,img/p1.nii.gz,,,cyst,1,2,inf,4", "z_mm='inf' is not a finite number"),
        ("p1,img/p1.nii.gz,,,cyst,1,2,3,0", "diameter_mm='0' must be > 0"),
        ("p1,img/p1.nii.gz,,,cyst,1,2,3,-5", "diameter_mm='-5' must be > 0"),
        ("p1,img/p1.nii.gz,,,cyst,1,2,,4", "incomplete click, z_mm empty"),
        ("p1,img/missing.nii.gz,,,cyst,1,2,3,4", "image 'img/missing.nii.gz' not found"),
        ("p1,img/p1.nii.gz,img/nomask.nii.gz,,cyst,,,,", "mask 'img/nomask.nii.gz' not found"),
        ("p1,img/p1.nii.gz,img/p1_mask.nii.gz,,cyst,,,,", "duplicates row 1"),
        ("p1,img/p1.nii.gz,img/p1_mask.nii.gz,0,cyst,,,,", "duplicates row 1"),  # 0 = empty: every lesion
        # row 1's empty label already takes every lesion of the mask: label 2 would be counted twice
        ("p1,img/p1.nii.gz,img/p1_mask.nii.gz,2,cyst,,,,", "label 2 is already taken by row 1"),
        (
            "p1,img/p1.nii.gz,img/p1_cysts.nii.gz,,Cyst,,,,",
            "'Cyst' differs only in upper/lower case from 'cyst'",
        ),
        ("p2,img/p1.nii.gz,,,cyst,1,2,3,4", "belongs to patient_id='p1' in row 1 but to 'p2'"),
        ("p1,img/p1.nii.gz,img/p1_mask.nii.gz,,cyst,,,", "8 fields but the header has 9"),
    ],
)
def test_row_errors_name_row_and_value(folder: Path, row_text: str, expected: str):
    msg = row_error(folder, row_text)
    assert expected in msg
    assert "row 2 (file line 3)" in msg


def test_manifest_cut_short_says_so(folder: Path):
    """A manifest cut mid-row (an interrupted copy: no newline at its end) was 'N fields but the header
    has M; check for a missing or extra comma', sending the user to look for a comma."""
    text = f"{HEADER}\np1,img/p1.nii.gz,img/p1_mask.nii.gz,,cyst,,,,\np1,img/p1.nii.gz,img/p1_ma"
    msg = read_error(write(folder, text))
    assert "row 2 (file line 3): 3 fields but the header has 9" in msg
    assert "does not end with a newline: it looks cut short" in msg and "comma" not in msg
    # the same short row ending with a newline is a typing slip, as before
    assert "check for a missing or extra comma" in read_error(write(folder, text + "\n"))


def test_row_errors_give_the_file_line_past_blank_lines_and_multi_line_fields(folder: Path):
    """'row N (file line N + 1)' was off by the blank lines above the row (and by the extra lines of
    a quoted field spanning lines): the user opened the file at the wrong line."""
    good = "p1,img/p1.nii.gz,img/p1_mask.nii.gz,,cyst,,,,"
    text = f'{HEADER}\n{good}\n\n\n"p1",img/p1.nii.gz,img/p1_mask.nii.gz,,"cy\nst",,,,\n{good[:-1]}x\n'
    lines = text.splitlines()
    msg = read_error(write(folder, text))
    assert "row 6 (file line 7)" in msg, msg
    assert lines[6].endswith("x")  # file line 7 is the bad row
    # a malformed row right after blank lines
    msg = read_error(write(folder, f"{HEADER}\n{good}\n\n\np1,img/p1.nii.gz\n"))
    assert "row 4 (file line 5): 2 fields" in msg, msg


def test_missing_file_error_says_relative_to_manifest(folder: Path):
    msg = row_error(folder, "p1,img/missing.nii.gz,,,cyst,1,2,3,4")
    assert "relative to the manifest's folder" in msg
    assert str(folder / "img/missing.nii.gz") in msg


@pytest.mark.skipif(os.sep != "/", reason="a backslash separates folders on Windows")
@pytest.mark.parametrize("col", ["image", "mask"])
def test_a_windows_path_says_to_use_forward_slashes(folder: Path, col: str):
    # was "image 'img\\\\p2.nii.gz' not found (looked for .../img\\p2.nii.gz)", with no word on why
    row = (
        "p2,img\\p2.nii.gz,img/p2_mask.nii.gz,,cyst,,,,"
        if col == "image"
        else "p2,img/p2.nii.gz,img\\p2_mask.nii.gz,,cyst,,,,"
    )
    msg = row_error(folder, row)
    assert f"{col} " in msg and "is a Windows path (backslashes)" in msg
    assert "write it with forward slashes ('img/p2" in msg


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "patient_id,image,mask,lable,lesion_class\n",
            "unknown column(s) lable; allowed columns are patient_id",
        ),
        (
            "patient_id,image,mask\np1,img/p1.nii.gz,img/p1_mask.nii.gz\n",
            "missing required column(s) lesion_class",
        ),
        ("patient_id,image,lesion_class\np1,img/p1.nii.gz,cyst\n", "no lesion source columns"),
        ("patient_id,image,lesion_class,x_mm,y_mm\np1,img/p1.nii.gz,cyst,1,2\n", "without z_mm, diameter_mm"),
        (
            "patient_id,image,label,lesion_class,x_mm,y_mm,z_mm,diameter_mm\n",
            "column label without column mask",
        ),
        ("patient_id,image,mask,mask,lesion_class\n", "duplicate column(s) mask"),
        ("patient_id,image,,mask,lesion_class\n", "header column 3 has no name"),
        ("patient_id;image;mask;lesion_class\np1;a;b;c\n", "separated by semicolons"),
        (  # was "row 1 (file line 2): 5 fields but the header has 2"
            "sep=,\npatient_id,image,mask,label,lesion_class\np1,img/p1.nii.gz,img/p1_mask.nii.gz,,cyst\n",
            "the first line 'sep=,' is Excel's separator hint, not the header; delete that line",
        ),
        ("", "the file is empty"),
        ("\n\n", "the file is empty"),
        ("patient_id,image,mask,lesion_class\n", "no data rows"),
        ('patient_id,image,mask,lesion_class\np1,"img/p1.nii.gz,x,y\n', "not a valid CSV file"),
    ],
)
def test_file_level_errors(folder: Path, text: str, expected: str):
    assert expected in read_error(write(folder, text))


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            "patient_id,image,mask,lesion_class\np\xe9,img/p1.nii.gz,img/p1_mask.nii.gz,cyst\n".encode(
                "latin-1"
            ),
            "not UTF-8",
        ),
        ("patient_id,image,mask,lesion_class\n".encode("utf-16"), "UTF-16"),
        (b"PK\x03\x04" + b"\x00" * 40, "Excel workbook"),
        (b"\x1f\x8b\x08\x00" + b"\x00" * 40, "binary file"),
    ],
)
def test_not_csv_or_bad_encoding(folder: Path, data: bytes, expected: str):
    path = folder / "manifest.csv"
    path.write_bytes(data)
    with pytest.raises(UserError, match=expected):
        read_manifest(path)


def test_checkpoint_given_as_the_manifest_is_named(folder: Path):
    # torch.save writes a zip: it was called an Excel workbook, to be saved as CSV
    import torch

    path = folder / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(UserError, match=r"model.pt: a PyTorch file .*not a CSV file.*--model"):
        read_manifest(path)


def test_latin1_error_gives_line(folder: Path):
    path = folder / "m.csv"
    path.write_bytes(b"patient_id,image,mask,lesion_class\np1,a,b,c\np\xe9,a,b,c\n")
    with pytest.raises(UserError, match="file line 3"):
        read_manifest(path)


def test_an_empty_label_after_a_labelled_row_of_the_same_mask_is_refused(folder: Path):
    """An empty label takes every lesion of its mask: with another row selecting one of them, that
    lesion was read twice (two lesion ids, counted twice in cv and its metrics)."""
    text = f"{HEADER}\np1,img/p1.nii.gz,img/p1_mask.nii.gz,1,cyst,,,,\np1,img/p1.nii.gz,img/p1_mask.nii.gz,,cyst,,,,\n"
    msg = read_error(write(folder, text))
    assert "row 2 (file line 3)" in msg and "label 1 of row 1 included" in msg


def test_missing_and_folder_manifest(folder: Path):
    with pytest.raises(UserError, match="file not found"):
        read_manifest(folder / "nope.csv")
    with pytest.raises(UserError, match="is a folder"):
        read_manifest(folder)


def test_write_manifest_round_trip_relative_paths(folder: Path):
    df = read_manifest(write(folder, good_text()))
    out_dir = folder / "sub" / "deeper"
    out = write_manifest(df, out_dir / "copy.csv")
    text = out.read_text()
    # paths are written relative to the new manifest's folder
    assert "../../img/p1.nii.gz" in text
    assert "image_path" not in text and "mask_path" not in text and ",row" not in text
    again = read_manifest(out)
    pd.testing.assert_series_equal(again["image_path"], df["image_path"])
    pd.testing.assert_series_equal(again["mask_path"], df["mask_path"])
    for col in ("patient_id", "lesion_class", "label", "x_mm", "diameter_mm"):
        pd.testing.assert_series_equal(again[col], df[col])
    assert not [p for p in out_dir.iterdir() if p.name != "copy.csv"]  # no temp files left


def test_write_manifest_drops_empty_optional_columns(folder: Path):
    df = pd.DataFrame(
        {
            "patient_id": ["a"],
            "image": [str(folder / "img/p1.nii.gz")],
            "mask": [str(folder / "img/p1_mask.nii.gz")],
            "lesion_class": ["cyst"],
        }
    )
    out = write_manifest(df, folder / "m.csv")
    assert out.read_text().splitlines()[0] == "patient_id,image,mask,lesion_class"
    assert read_manifest(out).loc[0, "mask"] == "img/p1_mask.nii.gz"


def test_write_manifest_rejects_unknown_column_and_leaves_nothing(folder: Path):
    df = pd.DataFrame(
        {"patient_id": ["a"], "image": ["x"], "mask": ["y"], "lesion_class": ["c"], "oops": [1]}
    )
    with pytest.raises(ValueError, match="oops"):
        write_manifest(df, folder / "bad.csv")
    assert not list(folder.glob("*bad*"))
