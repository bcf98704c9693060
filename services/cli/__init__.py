"""The `clawhub` command line: run the suite, publish, deploy, invoke."""
