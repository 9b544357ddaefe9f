"""What every benchmark here does at its end: name the CPU, write OUT/NAME.json and OUT/NAME.md."""
import pathlib
import platform

from sr3d import files as sr3d_files


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def write_report(out, name: str, payload: dict, lines: list[str]) -> None:
    """OUT/NAME.json (payload) and OUT/NAME.md (lines), and the Markdown on stdout."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sr3d_files.write_json(out / f"{name}.json", payload)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
