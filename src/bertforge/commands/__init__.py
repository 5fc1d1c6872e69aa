"""The command layer: one module per command family, each holding its commands' arguments
(`add_*_arguments(parser)`) and runners (`run_*(args) -> int`). A runner parses its arguments, calls the
library and prints; it imports the library inside the function, so `bertforge --help` never loads torch.
`bertforge.cli` is only the table that names them."""
