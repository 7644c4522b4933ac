"""fluxmq.protocol"""
