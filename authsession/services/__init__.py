"""Adapters for the outbound services: the user service and the mail service."""
