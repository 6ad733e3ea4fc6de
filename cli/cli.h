/* cli.h - subcommands of the `jem` tool; each lives in cli/cmd_<name>.c. */
#ifndef JEM_CLI_H
#define JEM_CLI_H

/* Each returns the process exit status: 0 ok, 1 failure/bad input, 2 usage. */
int cmd_info(int argc, char **argv);
int cmd_score(int argc, char **argv);
int cmd_sample(int argc, char **argv);
int cmd_init(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_calibrate(int argc, char **argv);
int cmd_buffer(int argc, char **argv);
int cmd_average(int argc, char **argv);
int cmd_import(int argc, char **argv);

#endif
