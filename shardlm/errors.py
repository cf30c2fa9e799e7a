"""Bad user input: `ConfigError`, one line on stderr and exit status 2 (imports nothing of shardlm)."""
import argparse
import sys


class ConfigError(ValueError):
  """Bad user input: printed as one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are ConfigErrors: one line, exit status 2, as every bad input."""

  def error(self, message):
    raise ConfigError(f'{message} (see {self.prog} --help)')


def print_error(message) -> None:
  print(f'shardlm: error: {message}', file=sys.stderr, flush=True)


def fail(error: Exception):
  """Prints `error` as shardlm's one line and exits with status 2."""
  print_error(error)
  sys.exit(2)


def warn(message: str) -> None:
  """One line for a value that is legal but almost certainly a mistake."""
  print(f'shardlm: warning: {message}', file=sys.stderr, flush=True)


def run_cli(main, argv=None):
  """Runs `main(argv)`; a ConfigError anywhere becomes the one-line error and exit status 2."""
  try:
    return main(argv)
  except ConfigError as e:
    fail(e)
