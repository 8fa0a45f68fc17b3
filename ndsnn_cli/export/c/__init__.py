"""The C target: a trained run as portable C99 (`static const` CSR arrays, static buffers, no heap, no libc).

Where things live:
- `generate`: the code generator (graph -> `ndsnn_model.h/.c` from `templates/`, plus the kernels, host
  demo and Makefile copied beside them); `CFLAGS`, the strict flags of every host build.
- `build`: the host compiler, compiling and running the demo, writing the output directory atomically.
- `verify`: the comparison with the reference runtime and its criteria (fp32; int8 arithmetic and
  quantisation).
- `exporter`: `ndsnn export --format c` (checkpoint -> verified directory) for the exporter registry.
"""

from ndsnn_cli.export.c.build import compile_demo, find_compiler, run_demo, write_directory
from ndsnn_cli.export.c.exporter import export_c, export_result
from ndsnn_cli.export.c.generate import CFLAGS, DTYPES, CSources, generate_sources
from ndsnn_cli.export.c.verify import compare, passes, reference_network, verify_sources
from ndsnn_cli.export.contract import normalise

__all__ = ["CFLAGS", "DTYPES", "CSources", "compare", "compile_demo", "export_c", "export_result", "find_compiler",
           "generate_sources", "normalise", "passes", "reference_network", "run_demo", "verify_sources",
           "write_directory"]
