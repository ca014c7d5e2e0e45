"""Approval gates for people: signed decision links and the approval endpoint they open."""
