"""The bottom layer, torch only: the enums, the spec of one fused evaluation and its one builder,
the options of a call and every argument check. Imports nothing else of fastkd."""
