"""The end-to-end protocol: `moe-vlm reproduce` runs every stage through the public commands (`moe-vlm train`,
`analyze`, `evaluate`) and writes the report. It sits above the packages it drives (configuration -> trainer ->
analysis -> pipeline -> hub / space): nothing below imports it."""
