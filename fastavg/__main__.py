"""``python -m fastavg``: which backends are available here, and why the others are not."""
import torch

from . import __version__, backend_status


def main() -> None:
    print(f"fastavg {__version__}, torch {torch.__version__}")
    for name, reason in backend_status().items():
        print(f"  {name:<10} {'available' if not reason else 'unavailable: ' + reason}")


if __name__ == "__main__":
    main()
