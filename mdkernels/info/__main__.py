"""``python -m mdkernels.info``: print :func:`mdkernels.info` as JSON."""

from mdkernels.info import main

main()
