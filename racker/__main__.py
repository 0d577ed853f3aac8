from racker.cli import entry

entry()
