"""racker's built-in compatibility checks, as ordinary pytest tests.

pytest --pyargs racker.checks --racker-images=all -n auto
"""
