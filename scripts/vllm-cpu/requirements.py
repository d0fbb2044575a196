"""Prints a wheel's install requirements (extras left out) with its torch pin replaced.

usage: requirements.py WHEEL TORCH_VERSION
"""
import sys
import zipfile
from email.parser import Parser


def main() -> None:
    wheel, torch_version = sys.argv[1], sys.argv[2]
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    for requirement in metadata.get_all("Requires-Dist") or []:
        spec, _, marker = requirement.partition(";")
        if "extra ==" in marker:
            continue
        if spec.strip().startswith("torch=="):
            # Every torch line (platform variants included) becomes the PyPI release.
            spec = f"torch=={torch_version}"
        print(f"{spec.strip()}; {marker.strip()}" if marker.strip() else spec.strip())


if __name__ == "__main__":
    main()
