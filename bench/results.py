"""bench/RESULTS.md: every bench script appends its section here (append only: several scripts write to it)."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(text: str) -> None:
    """Append a section to RESULTS.md as printed (the caller puts the blank line that opens it)."""
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(text)
