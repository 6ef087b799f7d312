"""``python -m meshdl.cli``: the ``meshdl`` command without a console script on PATH."""
from meshdl.cli import main

if __name__ == "__main__":
    main(prog_name="meshdl")
