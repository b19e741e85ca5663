"""Tools for speedrun records: log parsing, run statistics and the leaderboard.

The modules also run as plain scripts (``python records/compare.py``), so they
import each other with a fallback; see ``compare.py``.
"""
