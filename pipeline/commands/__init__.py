"""One module per `strata` command; pipeline/cli.py holds the parser and the table of commands."""
