"""`python -m bench` from the repo root, and the `decodebench` console script: the CLI, after the process is
prepared for the kernels (bench/interpreter.py)."""

from bench.interpreter import setup


def main(argv=None) -> int:
    setup()  # before any kernel module is imported: @triton.jit reads TRITON_INTERPRET at decoration
    from bench.commands.cli import main as cli_main  # here: it imports the kernel modules

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
