"""Documents -> grounded QA pairs with an LLM (`tunesmith synth DOCS... --out qa.jsonl`).

read (.md .txt .rst .html, .pdf with the `pdf` extra) -> sections by headings -> token windows with overlap
(those three: data/documents.py) -> prompt for N pairs (after a worked example), as JSON or Q:/A: lines
(synth/generators.py) -> parse (JSON array/object, fenced, truncated, or Q:/A: lines; malformed output is
retried with sampling) -> filters: length, grounding in the chunk, echo (the answer only restates the
question), near-duplicate questions, and leakage (a question near one already kept on the other side)
(synth/pairs.py) -> append to the output (synth/run.py: the files, resuming, the report, `synth` and
`synth_cli`).

Nothing is re-exported here: import from the module that owns the name.
"""
