"""Bounces: reply classification, DSN parsing, VERP return paths and verify-before-resend."""
