"""api/handlers"""
