"""The benchmark report writer keeps everything outside its own section."""

from pathlib import Path

from fedinterest.benchmarks.report import replace_section


def test_replace_section_keeps_the_rest(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    replace_section(doc, "quality", "| a |")
    replace_section(doc, "device", "| d |")
    replace_section(doc, "quality", "| b |")
    text = doc.read_text()
    assert "intro" in text and "| d |" in text and "| b |" in text and "| a |" not in text
    assert text.index("quality:begin") < text.index("device:begin")
