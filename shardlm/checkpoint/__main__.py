"""`python -m shardlm.checkpoint inspect DIR` and `... export-params DIR OUT`."""
from shardlm.checkpoint import cli

cli.main()
