"""One plain function per stage; the CLI, DVC and Prefect all call these."""
