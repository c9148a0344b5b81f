"""Command-line entry points: `xa-generate` (xa_runtime.cli.generate) and `xa-bench`
(xa_runtime.cli.bench). They parse, check and report; the work is the library's."""
