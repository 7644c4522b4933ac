"""fluxmq.config"""
