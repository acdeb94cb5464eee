"""guests"""
